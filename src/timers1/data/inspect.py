"""`timers1 data inspect`: what a corpus holds, and a picture of some of its series."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from timers1.data.corpus import Corpus, length_histogram, read_corpus


def corpus_stats(corpus: Corpus) -> dict:
    """Counts, length percentiles and histogram, and the mix by domain and by source."""
    lengths = corpus.lengths
    total = int(lengths.sum())

    def mix(codes: np.ndarray, names: list[str]) -> list[dict]:
        rows = np.bincount(codes, minlength=len(names))
        points = np.bincount(codes, weights=lengths, minlength=len(names))
        order = np.argsort(-points)
        return [{"name": names[i], "series": int(rows[i]), "points": int(points[i]),
                 "point_share": round(float(points[i]) / max(total, 1), 4)} for i in order]

    return {
        "series": corpus.num_series,
        "points": total,
        "shards": len(corpus.manifest.get("shards", [])),
        "length_percentiles": {f"p{q}": int(np.percentile(lengths, q)) for q in (0, 10, 50, 90, 100)}
        if len(lengths) else {},
        "length_histogram": dict(length_histogram(lengths)),
        "domains": mix(corpus.domain_codes, corpus.domain_names),
        "sources": mix(corpus.source_codes, corpus.source_names),
    }


def plot_samples(corpus: Corpus, png_path: str | Path, num_series: int = 12, seed: int = 0,
                 max_points: int = 2048) -> Path:
    """A PNG grid of randomly chosen series (their last max_points points), titled by source."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(seed)
    picks = np.sort(rng.choice(corpus.num_series, size=min(num_series, corpus.num_series), replace=False))
    cols = 3
    rows = int(np.ceil(len(picks) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.2 * rows), squeeze=False)
    for ax in axes.flat[len(picks):]:
        ax.axis("off")
    for ax, index in zip(axes.flat, picks.tolist()):
        values = corpus.series(index)[-max_points:]
        ax.plot(values, linewidth=0.6)
        freq = corpus.freqs[index] or "?"
        ax.set_title(f"{corpus.item_ids[index][:40]} ({freq}, {corpus.lengths[index]} pts)", fontsize=7)
        ax.tick_params(labelsize=6)
    fig.tight_layout()
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=90)
    plt.close(fig)
    return png_path


def format_stats(stats: dict) -> str:
    lines = [f"{stats['series']} series, {stats['points']:,} points, {stats['shards']} shard(s)",
             "length percentiles: " + ", ".join(f"{k}={v}" for k, v in stats["length_percentiles"].items()),
             "length histogram:"]
    width = max(stats["length_histogram"].values() or [1]) or 1
    for label, count in stats["length_histogram"].items():
        lines.append(f"  {label:>12} {count:>8} {'#' * int(round(40 * count / width))}")
    lines.append("domains (by points):")
    for row in stats["domains"]:
        lines.append(f"  {row['name']:<20} series={row['series']:<8} points={row['points']:<12,} {100 * row['point_share']:.1f}%")
    lines.append("sources (by points):")
    for row in stats["sources"]:
        lines.append(f"  {row['name']:<32} series={row['series']:<8} points={row['points']:<12,} {100 * row['point_share']:.1f}%")
    return "\n".join(lines)


def inspect_corpus(corpus_dir: str | Path, png_path: str | Path | None = None, num_series: int = 12) -> dict:
    corpus = read_corpus(corpus_dir)
    stats = corpus_stats(corpus)
    if png_path:
        stats["png"] = str(plot_samples(corpus, png_path, num_series))
    return stats
