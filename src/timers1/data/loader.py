"""Training windows from a corpus: deterministic, rank-sharded, resumable mid-epoch.

Shape legend: B windows per batch, W = window_points (context + horizon points).

The stream is a pure function of a global *slot* index. An epoch is the list of slots

    slots_per_epoch = sum_i k_i,   k_i = round(weight_i * ceil(len_i / W))

so every series contributes windows in proportion to its length (at least one, so short series
are seen), scaled by the mixture weight of its domain and source. Series of the validation
split (``corpus.held_out``) get weight 0: no slot, on any rank or worker, maps to them (the
trainer scores them through ``validation_windows``). Epoch e visits its slots in the order of a
keyed Feistel permutation (seed, e): a bijection computed per slot in O(1) memory, so even a
trillion-point corpus needs no shuffled index array. Slot -> series by a binary search over the
cumulative k_i; the window's start, the flip and the resampling factor
are pure functions of (seed, slot), so a window does not depend on the batch or rank that draws it.

Rank r of R takes global batch blocks r, r + R, r + 2R, ...: its batch b holds slots
``slot_base + (b * R + r) * B + [0, B)``. Ranks are therefore disjoint, and interleaving the R
rank streams gives exactly the single-rank stream. DataLoader workers split a rank's batches
round-robin starting at the resume point (worker w makes batches start + w, start + w + N,
...), which is the order in which torch's DataLoader returns them, so the batches do not
depend on the number of workers and a restored loader continues exactly where it stopped.

Windows: a series of at least W points gives a fully observed window at a uniformly drawn
start; a shorter series gives its whole self, left-padded with zeros (mask 0). Values are not
normalised here; the model normalises each window.

API for the trainer::

    loader = make_loader(cfg.data, corpus_dir, window_points, batch_size, rank, world_size)
    for batch in loader:                  # endless; one active iterator at a time
        batch["values"], batch["mask"]    # float32 [B, W]; mask 1 = observed, 0 = padding
        ...
        ckpt["data"] = loader.state_dict()
    loader.load_state_dict(ckpt["data"])  # the next batch is the one that would have come

``state_dict`` records batches consumed plus the layout. Restoring with the same (seed,
world size, batch size, window) is exact; with another world size or batch size the loader
continues at the first slot no rank has consumed yet (exact when every rank consumed the same
number of batches, as synchronous data parallelism does).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from timers1.data.augment import flip_sign, fourier_resample
from timers1.data.compiled import MappedCorpus, open_compiled
from timers1.data.corpus import Corpus, is_synthetic_source
from timers1.errors import InputError

STATE_VERSION = 1
DEFAULT_RESAMPLE_FACTORS = (0.5, 0.75, 1.5, 2.0)

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: a fast, well-distributed 64-bit mixing function (wraps mod 2^64)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def feistel_permute(index: np.ndarray, size: int, key: int) -> np.ndarray:
    """A keyed bijection of [0, size), applied elementwise to index (int64 array).

    Four-round Feistel network on the smallest even number of bits covering size; values that
    land outside [0, size) are encrypted again (cycle walking), which keeps it a bijection of
    [0, size). The domain is at most 4x size, so a few rounds of walking suffice.
    """
    index = np.asarray(index, dtype=np.int64)
    if size <= 1:
        return np.zeros_like(index)
    half = max(1, (int(size - 1).bit_length() + 1) // 2)
    mask = np.uint64((1 << half) - 1)
    keys = _mix64(np.arange(1, 5, dtype=np.uint64) + np.uint64(key & 0xFFFFFFFFFFFFFFFF))

    def encrypt(x: np.ndarray) -> np.ndarray:
        left, right = x >> np.uint64(half), x & mask
        for k in keys:
            left, right = right, (left ^ _mix64(right ^ k)) & mask
        return (left << np.uint64(half)) | right

    with np.errstate(over="ignore"):
        out = encrypt(index.astype(np.uint64))
        outside = out >= np.uint64(size)
        while outside.any():
            out[outside] = encrypt(out[outside])
            outside = out >= np.uint64(size)
    return out.astype(np.int64)


def _key(*parts: int) -> int:
    """A 64-bit key from small integers (seed, epoch, ...)."""
    with np.errstate(over="ignore"):
        acc = np.uint64(0x9E3779B97F4A7C15)
        for p in parts:
            acc = _mix64(np.asarray(acc ^ np.uint64(p & 0xFFFFFFFFFFFFFFFF)))
    return int(acc)


@dataclass
class WindowBatch:
    values: np.ndarray  # float32 [B, W]
    mask: np.ndarray  # float32 [B, W]
    series: np.ndarray  # int64 [B] corpus row of each window
    start: np.ndarray  # int64 [B] first source point of each window within its series
    factor: np.ndarray  # float32 [B] source points per window point (1 = not resampled)
    flipped: np.ndarray  # bool [B]


class WindowSampler:
    """Maps a range of global slots to a batch of windows; holds no iteration state."""

    def __init__(self, corpus: Corpus | MappedCorpus, window_points: int, seed: int = 0,
                 mixture_weights: dict[str, float] | None = None, flip_probability: float = 0.0,
                 resample_probability: float = 0.0,
                 resample_factors: tuple[float, ...] | list[float] = DEFAULT_RESAMPLE_FACTORS,
                 truncate_probability: float = 0.0, truncate_min_points: int = 1,
                 mixup_probability: float = 0.0, mixup_max_series: int = 3):
        if window_points < 1:
            raise InputError(f"window_points={window_points!r}: must be >= 1")
        if corpus.num_series == 0:
            raise InputError(f"{corpus.directory}: corpus has no series")
        for name, p in (("flip_probability", flip_probability), ("resample_probability", resample_probability),
                        ("truncate_probability", truncate_probability), ("mixup_probability", mixup_probability)):
            if not 0.0 <= p <= 1.0:
                raise InputError(f"{name}={p!r}: must be in [0, 1]")
        if not resample_factors or any(f <= 0 for f in resample_factors):
            raise InputError(f"resample_factors={list(resample_factors)!r}: must be a non-empty list of numbers > 0")
        self.corpus = corpus
        self.window_points = int(window_points)
        self.seed = int(seed)
        self.flip_probability = float(flip_probability)
        self.resample_probability = float(resample_probability)
        self.resample_factors = np.asarray(resample_factors, dtype=np.float64)
        if not 1 <= truncate_min_points <= window_points:
            raise InputError(f"truncate_min_points={truncate_min_points!r}: must be in [1, {window_points}]")
        self.truncate_probability = float(truncate_probability)
        self.truncate_min_points = int(truncate_min_points)
        if not (isinstance(mixup_max_series, (int, np.integer)) and mixup_max_series >= 2):
            raise InputError(f"mixup_max_series={mixup_max_series!r}: must be an integer >= 2")
        self.mixup_probability = float(mixup_probability)
        self.mixup_max_series = int(mixup_max_series)
        # Source points a window needs at each factor (>= 2 so a spectrum exists).
        self._source_points = np.maximum(2, np.round(self.resample_factors * self.window_points)).astype(np.int64)
        self.lengths = corpus.lengths.astype(np.int64)
        self.series_weight = self._series_weights(mixture_weights or {})
        natural = np.ceil(self.lengths / self.window_points)
        expected = natural * self.series_weight
        # Stochastic rounding with a fixed draw: a weight of 0.3 keeps 30% of such series'
        # windows on average, and the epoch layout is a function of the seed alone.
        frac_rng = np.random.default_rng([self.seed, 7])
        counts = np.floor(expected + frac_rng.random(len(expected))).astype(np.int64)
        if counts.sum() == 0:
            raise InputError(f"mixture weights {mixture_weights!r} leave no series of "
                             f"{corpus.directory} to sample")
        self.windows_per_series = counts
        self.cumulative_windows = np.concatenate([[0], np.cumsum(counts)])
        self.slots_per_epoch = int(self.cumulative_windows[-1])

    def _series_weights(self, mixture_weights: dict[str, float]) -> np.ndarray:
        corpus = self.corpus
        known = set(corpus.domain_names) | set(corpus.source_names)
        for name, weight in mixture_weights.items():
            if name not in known:
                raise InputError(f"mixture_weights.{name}: no domain or source of that name in "
                                 f"{corpus.directory}; known: {', '.join(sorted(known))}")
            if not (isinstance(weight, (int, float)) and weight >= 0 and math.isfinite(weight)):
                raise InputError(f"mixture_weights.{name}={weight!r}: must be a finite number >= 0")
        domain_w = np.array([mixture_weights.get(n, 1.0) for n in corpus.domain_names], dtype=np.float64)
        source_w = np.array([mixture_weights.get(n, 1.0) for n in corpus.source_names], dtype=np.float64)
        # Held-out series weigh 0 here, not by leaving them out of the arrays: corpus rows stay
        # slot targets' indices, and every other series keeps its stochastic-rounding draw.
        return domain_w[corpus.domain_codes] * source_w[corpus.source_codes] * ~np.asarray(corpus.held_out, dtype=bool)

    # ------------------------------------------------------------------------------------
    def slot_series(self, slots: np.ndarray) -> np.ndarray:
        """Corpus row of each global slot."""
        slots = np.asarray(slots, dtype=np.int64)
        epoch = slots // self.slots_per_epoch
        position = slots % self.slots_per_epoch
        permuted = np.empty_like(position)
        for e in np.unique(epoch):  # a batch spans one epoch, or two at a boundary
            sel = epoch == e
            permuted[sel] = feistel_permute(position[sel], self.slots_per_epoch, _key(self.seed, 2, int(e)))
        return self._series_at(permuted)

    def _series_at(self, positions: np.ndarray) -> np.ndarray:
        """Corpus row of each position in an epoch's unpermuted slot order [0, slots_per_epoch)."""
        return np.searchsorted(self.cumulative_windows, positions, side="right") - 1

    def _slot_uniforms(self, slots: np.ndarray, streams: int, salt: int = 1) -> np.ndarray:
        """[streams, len(slots)] independent uniforms in [0, 1), a pure function of (seed, salt, slot)."""
        key = np.uint64(_key(self.seed, salt))
        lanes = slots.astype(np.uint64)[None, :] * np.uint64(streams) + np.arange(streams, dtype=np.uint64)[:, None]
        with np.errstate(over="ignore"):
            bits = _mix64(_mix64(lanes ^ key))
        return (bits >> np.uint64(11)).astype(np.float64) * (1.0 / 2**53)

    def sample(self, first_slot: int, batch_size: int) -> WindowBatch:
        """The windows of slots [first_slot, first_slot + batch_size)."""
        W, B = self.window_points, int(batch_size)
        slots = np.arange(first_slot, first_slot + B, dtype=np.int64)
        series = self.slot_series(slots)
        # Draws are keyed by (seed, slot), not by the batch: a window is the same whichever
        # rank, batch size or layout samples it, so a checkpoint resumed at another layout
        # sees exactly the data the original layout would have. Every draw is made whatever
        # the probabilities, so changing one augmentation's probability leaves the windows
        # and the other augmentation unchanged.
        u_start, u_flip, u_resample, u_factor = self._slot_uniforms(slots, 4)
        factor_index = np.minimum((u_factor * len(self.resample_factors)).astype(np.int64),
                                  len(self.resample_factors) - 1)

        n = self.lengths[series]
        source_points = np.full(B, W, dtype=np.int64)
        resampled = u_resample < self.resample_probability
        if resampled.any():
            wanted = self._source_points[factor_index]
            # A series too short for the factor's span keeps its native rate.
            resampled &= n >= wanted
            source_points = np.where(resampled, wanted, W)
        taken = np.minimum(n, source_points)
        start = np.minimum((u_start * (n - taken + 1)).astype(np.int64), n - taken)

        values = np.zeros((B, W), dtype=np.float32)
        read = self.corpus.window
        plain = np.flatnonzero(~resampled)
        # Row copies of contiguous spans beat a fancy-index gather: no [B, W] index array, and
        # a memory-mapped corpus pages in only the windows drawn.
        pad = W - taken
        for i in plain.tolist():
            values[i, pad[i]:] = read(series[i], start[i], taken[i])
        if resampled.any():
            for m in np.unique(source_points[resampled]).tolist():
                rows = np.flatnonzero(resampled & (source_points == m))
                segments = np.stack([read(series[i], start[i], m) for i in rows.tolist()])
                values[rows] = fourier_resample(segments, W)
            pad = np.where(resampled, 0, pad)
        if self.truncate_probability > 0:
            # Keep a random-length suffix: the model then trains on short contexts normalised
            # by their own statistics, as it meets short series at inference. Lengths are
            # log-uniform: a few patches of context is where full windows teach least. Its own
            # salt keeps the other draws identical to an untruncated stream.
            u_truncate, u_keep = self._slot_uniforms(slots, 2, salt=3)
            lo = self.truncate_min_points
            keep = np.clip(np.round(lo * (W / lo) ** u_keep).astype(np.int64), lo, W)
            cut = (u_truncate < self.truncate_probability) & (keep < W - pad)
            if cut.any():
                pad = np.where(cut, W - keep, pad)
                values[np.arange(W)[None, :] < pad[:, None]] = 0.0
        mask = (np.arange(W)[None, :] >= pad[:, None]).astype(np.float32)
        if self.mixup_probability > 0:
            self._mix(values, mask, slots)
        flipped = u_flip < self.flip_probability
        if flipped.any():
            flip_sign(values, flipped)
        factor = np.where(resampled, source_points / W, 1.0).astype(np.float32)
        return WindowBatch(values, mask, series, start, factor, flipped)

    def _mix(self, values: np.ndarray, mask: np.ndarray, slots: np.ndarray) -> None:
        """TSMixup (Chronos, Ansari et al. 2024), in place: a row drawn for it becomes a convex
        combination of itself and 1 to ``mixup_max_series - 1`` other windows, each standardised
        over its observed points, with Dirichlet(1) weights, then put back at the row's own level
        and spread. New series that no generator family makes (a growth curve under an hourly
        profile, a random walk over a season) from the corpus's own. Partners are drawn like
        slots (in proportion to windows, never a held-out series; now and then the row's own
        series); one whose series is shorter than the row's observed span drops out of the blend
        (the mask stays the row's), and a flat row is left as it is (it has no spread to put a
        blend back at). Every draw is a pure function of (seed, slot)."""
        J = self.mixup_max_series - 1
        u = self._slot_uniforms(slots, 3 + 3 * J, salt=4)
        rows = np.flatnonzero(u[0] < self.mixup_probability)
        if rows.size == 0:
            return
        W = self.window_points
        partners = 1 + np.minimum((u[1] * J).astype(np.int64), J - 1)
        u_start, u_weight = u[3 + J:3 + 2 * J], u[3 + 2 * J:]
        partner_series = self._series_at((u[3:3 + J] * self.slots_per_epoch).astype(np.int64))  # [J, B]
        read = self.corpus.window

        def standardised(x: np.ndarray) -> tuple[np.ndarray, float, float]:
            mean, std = float(x.mean()), float(x.std())
            return (x - mean) / (std if std > 0 else 1.0), mean, std

        for i in rows.tolist():
            span = int(mask[i].sum())  # observed points: a suffix of the row
            z, mean, std = standardised(values[i, W - span:].astype(np.float64))
            if std == 0:
                continue
            exp_draws = -np.log1p(-np.concatenate([[u[2, i]], u_weight[:, i]]))  # Exp(1) -> Dirichlet(1)
            parts, weights = [z], [exp_draws[0]]
            for j in range(int(partners[i])):
                series = int(partner_series[j, i])
                n = int(self.lengths[series])
                if n < span:
                    continue
                start = min(int(u_start[j, i] * (n - span + 1)), n - span)
                parts.append(standardised(read(series, start, span).astype(np.float64))[0])
                weights.append(exp_draws[j + 1])
            if len(parts) > 1:
                blend = np.asarray(weights) @ np.stack(parts) / sum(weights)
                values[i, W - span:] = mean + std * blend


def _validation_picks(corpus: Corpus | MappedCorpus, window_points: int, max_windows: int) -> list[tuple[int, int]]:
    """(corpus row, windows before the series' end) of every validation window, in order."""
    W = int(window_points)
    rows = np.flatnonzero(np.asarray(corpus.held_out, dtype=bool))
    lengths = corpus.lengths[rows].astype(np.int64)
    windows_in_series = np.maximum(1, lengths // W)
    picked: list[tuple[int, int]] = []
    k = 0
    while len(picked) < max_windows and k < windows_in_series.max(initial=0):
        picked.extend((int(row), k) for row in rows[windows_in_series > k][: max_windows - len(picked)])
        k += 1
    return picked


def validation_windows(corpus: Corpus | MappedCorpus, window_points: int, max_windows: int) -> tuple[np.ndarray, np.ndarray]:
    """The fixed validation set: (values [N, W] float32, mask [N, W] float32) from the held-out
    series only, N <= ``max_windows``, the same for every call on the same corpus.

    Window k of a series ends k windows before its end (k = 0: its last ``window_points``
    points, the part a forecaster is asked about); a series shorter than W is one window, left-
    padded as in training. Windows are taken k by k over the held-out series in corpus order
    (every series' last window first), so a small ``max_windows`` still spans many series and
    long series add windows only once every series has one. No augmentation.
    """
    W = int(window_points)
    picked = _validation_picks(corpus, W, max_windows)
    values = np.zeros((len(picked), W), dtype=np.float32)
    mask = np.zeros((len(picked), W), dtype=np.float32)
    for i, (row, k) in enumerate(picked):
        n = int(corpus.lengths[row])
        taken = min(n, W)
        values[i, W - taken:] = corpus.window(row, n - taken - k * W, taken)
        mask[i, W - taken:] = 1.0
    return values, mask


def validation_real_windows(corpus: Corpus | MappedCorpus, window_points: int, max_windows: int) -> np.ndarray:
    """[N] bool, aligned with ``validation_windows``: whether each window is of a real source
    (not ``corpus.is_synthetic_source``), so real data can be scored on its own."""
    names = corpus.source_names
    return np.array([not is_synthetic_source(names[int(corpus.source_codes[row])])
                     for row, _ in _validation_picks(corpus, window_points, max_windows)], dtype=bool)


def validation_sources(corpus: Corpus | MappedCorpus, window_points: int, max_windows: int) -> list[dict]:
    """What ``validation_windows`` scores, by source: [{"source", "kind", "series", "windows"}],
    most windows first. ``kind`` is "synthetic" for the built-in generators
    (``corpus.is_synthetic_source``) and "real" for everything else, so a run can say how much of
    the score it chooses on comes from real data."""
    by_source: dict[str, dict] = {}
    seen: set[int] = set()
    for row, _ in _validation_picks(corpus, window_points, max_windows):
        name = corpus.source_names[int(corpus.source_codes[row])]
        entry = by_source.setdefault(name, {"source": name, "kind": "synthetic" if is_synthetic_source(name) else "real",
                                            "series": 0, "windows": 0})
        entry["windows"] += 1
        if row not in seen:
            seen.add(row)
            entry["series"] += 1
    return sorted(by_source.values(), key=lambda e: (-e["windows"], e["source"]))


def observes_more_context(mask_NW: np.ndarray, context_points: int, target_points: int) -> np.ndarray:
    """[N] bool: the windows whose context (all but the last ``target_points``) observes more than
    ``context_points`` points, the ones ``cut_context`` keeps."""
    return mask_NW[:, : mask_NW.shape[1] - target_points].sum(axis=1) > context_points


def cut_context(values_NW: np.ndarray, mask_NW: np.ndarray, context_points: int,
                target_points: int) -> tuple[np.ndarray, np.ndarray]:
    """The windows that observe more than ``context_points`` context points, cut to their last
    ``context_points`` (and the ``target_points`` after them), the rest padded as a short series
    is: the same forecasts asked from a short context, as short series (yearly, quarterly,
    a few years of monthly data) ask them. Windows already that short are left out, not repeated."""
    W = values_NW.shape[1]
    keep = int(context_points) + int(target_points)
    longer = observes_more_context(mask_NW, context_points, target_points)
    values, mask = values_NW[longer].copy(), mask_NW[longer].copy()
    values[:, : W - keep] = 0.0
    mask[:, : W - keep] = 0.0
    return values, mask


class WindowDataset(IterableDataset):
    """One rank's endless batch stream, split over DataLoader workers (see the module doc)."""

    def __init__(self, sampler: WindowSampler, batch_size: int, rank: int, world_size: int,
                 slot_base: int = 0, start_batch: int = 0):
        super().__init__()
        self.sampler = sampler
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.slot_base = slot_base
        self.start_batch = start_batch

    def first_slot(self, batch_index: int) -> int:
        return self.slot_base + (batch_index * self.world_size + self.rank) * self.batch_size

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        batch_index = self.start_batch + worker
        while True:
            batch = self.sampler.sample(self.first_slot(batch_index), self.batch_size)
            yield {"values": torch.from_numpy(batch.values), "mask": torch.from_numpy(batch.mask)}
            batch_index += workers


class CorpusLoader:
    """Iterable of batches {'values', 'mask'} with exact state_dict()/load_state_dict()."""

    def __init__(self, corpus: Corpus | MappedCorpus | str | Path, window_points: int, batch_size: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0, num_workers: int = 0,
                 mixture_weights: dict[str, float] | None = None, flip_probability: float = 0.0,
                 resample_probability: float = 0.0,
                 resample_factors: tuple[float, ...] | list[float] = DEFAULT_RESAMPLE_FACTORS,
                 truncate_probability: float = 0.0, truncate_min_points: int = 1,
                 mixup_probability: float = 0.0, mixup_max_series: int = 3, pin_memory: bool = False):
        if world_size < 1 or not 0 <= rank < world_size:
            raise InputError(f"rank={rank!r}, world_size={world_size!r}: need 0 <= rank < world_size")
        if batch_size < 1:
            raise InputError(f"batch_size={batch_size!r}: must be >= 1")
        if num_workers < 0:
            raise InputError(f"num_workers={num_workers!r}: must be >= 0")
        if not isinstance(corpus, (Corpus, MappedCorpus)):
            corpus = open_compiled(corpus)
        self.sampler = WindowSampler(corpus, window_points, seed, mixture_weights, flip_probability,
                                     resample_probability, resample_factors, truncate_probability,
                                     truncate_min_points, mixup_probability, mixup_max_series)
        self.batch_size = int(batch_size)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.num_workers = int(num_workers)
        self.pin_memory = pin_memory
        self._slot_base = 0
        self._batches = 0

    @property
    def batches_consumed(self) -> int:
        return self._batches

    @property
    def global_slots_consumed(self) -> int:
        """Slots consumed by all ranks together (assuming they are in step)."""
        return self._slot_base + self._batches * self.world_size * self.batch_size

    @property
    def epoch(self) -> float:
        """Epochs of the corpus consumed so far, over all ranks (fractional)."""
        return self.global_slots_consumed / self.sampler.slots_per_epoch

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        dataset = WindowDataset(self.sampler, self.batch_size, self.rank, self.world_size,
                                self._slot_base, self._batches)
        if self.num_workers == 0:
            source = iter(dataset)
        else:
            source = iter(DataLoader(dataset, batch_size=None, num_workers=self.num_workers,
                                     pin_memory=self.pin_memory, persistent_workers=False))
        for batch in source:
            # Counted as it is handed over, so state_dict() taken after the consumer has used
            # a batch resumes with the next one, whatever the workers have prefetched.
            self._batches += 1
            yield batch

    def _layout(self) -> dict[str, Any]:
        s = self.sampler
        return {"seed": s.seed, "window_points": s.window_points, "corpus": s.corpus.fingerprint,
                "slots_per_epoch": s.slots_per_epoch, "flip_probability": s.flip_probability,
                "resample_probability": s.resample_probability,
                "resample_factors": [float(f) for f in s.resample_factors],
                "truncate_probability": s.truncate_probability, "truncate_min_points": s.truncate_min_points,
                "mixup_probability": s.mixup_probability,
                **({"mixup_max_series": s.mixup_max_series} if s.mixup_probability > 0 else {})}

    def state_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "batches_consumed": self._batches, "slot_base": self._slot_base,
                "rank": self.rank, "world_size": self.world_size, "batch_size": self.batch_size,
                **self._layout()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise InputError(f"loader state: version={state.get('version')!r}, expected {STATE_VERSION}")
        layout = self._layout()
        state = {"mixup_probability": 0.0, **state}  # saved before mixup existed: it was off
        for key, value in layout.items():
            if state.get(key) != value:
                raise InputError(f"loader state: {key}={state.get(key)!r} but this loader has {value!r}; "
                                 f"resume needs the same corpus, seed, window and augmentation")
        if state["world_size"] == self.world_size and state["batch_size"] == self.batch_size:
            self._slot_base, self._batches = int(state["slot_base"]), int(state["batches_consumed"])
        else:
            # Another layout: start after every slot the old layout handed out.
            self._slot_base = int(state["slot_base"]) + int(state["batches_consumed"]) * \
                int(state["world_size"]) * int(state["batch_size"])
            self._batches = 0


def make_loader(data_cfg, corpus_dir: str | Path | Corpus | MappedCorpus, window_points: int, batch_size: int,
                rank: int = 0, world_size: int = 1, pin_memory: bool = False,
                truncate_min_points: int = 1) -> CorpusLoader:
    """The trainer's entry point: a CorpusLoader configured from a DataConfig.

    Reads seed, num_workers, mixture_weights, flip_probability, resample_probability,
    resample_factors, truncate_probability and mixup_* (when the config has them) from ``data_cfg``;
    ``batch_size`` is per rank; ``truncate_min_points`` is the shortest suffix a truncated
    window keeps (the trainer passes one context patch plus the future points).
    """
    factors = getattr(data_cfg, "resample_factors", None) or DEFAULT_RESAMPLE_FACTORS
    return CorpusLoader(corpus_dir, window_points, batch_size, rank=rank, world_size=world_size,
                        seed=data_cfg.seed, num_workers=data_cfg.num_workers,
                        mixture_weights=dict(data_cfg.mixture_weights),
                        flip_probability=data_cfg.flip_probability,
                        resample_probability=data_cfg.resample_probability,
                        resample_factors=tuple(factors),
                        truncate_probability=getattr(data_cfg, "truncate_probability", 0.0),
                        truncate_min_points=truncate_min_points,
                        mixup_probability=getattr(data_cfg, "mixup_probability", 0.0),
                        mixup_max_series=getattr(data_cfg, "mixup_max_series", 3), pin_memory=pin_memory)
