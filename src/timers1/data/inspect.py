"""`timers1 data inspect`: what a corpus holds, and a picture of some of its series."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from timers1.data.corpus import Corpus, length_histogram, read_corpus
from timers1.errors import InputError


def corpus_stats(corpus: Corpus) -> dict:
    """Counts, length percentiles and histogram, the mix by domain and by source, the validation
    split and the real sources by package and dataset (from the build summary)."""
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
        "held_out_series": int(np.count_nonzero(corpus.held_out)),
        "held_out_points": int(lengths[corpus.held_out].sum()) if len(lengths) else 0,
        "real_sources": list(corpus.manifest.get("summary", {}).get("real_sources", [])),
    }


def sample_indices(corpus: Corpus, num_series: int, seed: int = 0) -> list[int]:
    """Up to ``num_series`` random series, in corpus order, skipping those with no non-zero value
    (padding-like series say nothing about the corpus in a picture)."""
    picks = []
    for index in np.random.default_rng(seed).permutation(corpus.num_series).tolist():
        if len(picks) == num_series:
            break
        if np.any(corpus.series(index) != 0):
            picks.append(index)
    return sorted(picks)


def panel_title(item_id: str, freq: str | None, length: int, shown: int) -> str:
    """The series, its frequency and how many of its points the panel shows."""
    points = f"{length:,} pts" if shown == length else f"last {shown:,} of {length:,} pts"
    return f"{item_id[:40]} ({freq or '?'}, {points})"


def plot_samples(corpus: Corpus, png_path: str | Path, num_series: int = 12, seed: int = 0,
                 max_points: int = 2048) -> Path:
    """A PNG grid of randomly chosen series (their last max_points points), titled by source."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    picks = sample_indices(corpus, num_series, seed)
    cols = 3
    rows = max(1, int(np.ceil(len(picks) / cols)))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.2 * rows), squeeze=False)
    for ax in axes.flat[len(picks):]:
        ax.axis("off")
    for ax, index in zip(axes.flat, picks):
        values = corpus.series(index)[-max_points:]
        ax.plot(values, linewidth=0.6)
        ax.set_title(panel_title(corpus.item_ids[index], corpus.freqs[index], int(corpus.lengths[index]),
                                 len(values)), fontsize=7)
        ax.tick_params(labelsize=6)
    fig.tight_layout()
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=90)
    plt.close(fig)
    return png_path


def format_stats(stats: dict) -> str:
    lines = [(f"{stats['corpus']}: " if "corpus" in stats else "")
             + f"{stats['series']} series, {stats['points']:,} points, {stats['shards']} shard(s)",
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
    lines.append(f"held out for validation (never trained on): {stats['held_out_series']} series, "
                 f"{stats['held_out_points']:,} points")
    lines.append("real sources (package / dataset):" if stats["real_sources"] else "real sources: none")
    for row in stats["real_sources"]:
        lines.append(f"  {row['package']:<12} {row['dataset']:<24} series={row['series']:<8} points={row['points']:<12,}"
                     + (f" {row['path']}" if row.get("path") else ""))
    return "\n".join(lines)


DEFAULT_PLOT_NAME = "samples.png"


def default_plot_path(corpus_dir: str | Path) -> Path:
    """``samples.png`` inside a local corpus directory; a corpus behind a URI needs an explicit path."""
    text = str(corpus_dir)
    if text.startswith("file://"):
        text = text[len("file://"):]
    elif "://" in text:
        raise InputError(f"{corpus_dir}: the sample plot of a corpus at a URI needs --plot PATH (or --no-plot)")
    return Path(text) / DEFAULT_PLOT_NAME


def inspect_corpus(corpus_dir: str | Path | None = None, png_path: str | Path | None = None, num_series: int = 12,
                   plot: bool = True) -> dict:
    """Statistics of a corpus (default: the built-in one, built first if the cache lacks it) and,
    with ``plot``, a sample plot at ``png_path`` (default: ``samples.png`` in the corpus directory)."""
    if corpus_dir is None:
        from timers1.data.builder import ensure_default_corpus

        corpus_dir = ensure_default_corpus()
    if plot and not png_path:
        png_path = default_plot_path(corpus_dir)
    corpus = read_corpus(corpus_dir)
    stats = {"corpus": str(corpus_dir), **corpus_stats(corpus)}
    if plot:
        stats["png"] = str(plot_samples(corpus, png_path, num_series))
    return stats
