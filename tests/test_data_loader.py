"""Window loader: determinism, exact resume with workers, rank disjointness, masks, augmentation."""

from __future__ import annotations

import itertools
from collections import Counter

import numpy as np
import pytest
import torch

from timers1.config import DataConfig
from timers1.data.augment import flip_sign, fourier_resample
from timers1.data.compiled import compile_corpus
from timers1.data.corpus import SeriesRecord, read_corpus, write_corpus
from timers1.data.loader import CorpusLoader, WindowSampler, feistel_permute, make_loader
from timers1.errors import InputError

W = 64


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    rng = np.random.default_rng(0)
    records = []
    for i in range(30):
        n = int(rng.integers(20, 400))  # some shorter than the window: left padding
        values = (np.arange(n) + 1000 * i).astype(np.float32)  # values identify series and position
        records.append(SeriesRecord(f"s{i}", values, domain=["energy", "web", "retail"][i % 3], source=f"src{i % 2}"))
    out = tmp_path_factory.mktemp("corpus")
    write_corpus(records, out)
    compile_corpus(out)  # loaders given a directory read the memory-mapped form
    return out


def _take(loader, n):
    return [{k: v.clone() for k, v in b.items()} for b in itertools.islice(iter(loader), n)]


def _same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x["values"], y["values"]) and torch.equal(x["mask"], y["mask"])


def test_batches_have_shape_dtype_and_left_padding(corpus_dir):
    loader = CorpusLoader(corpus_dir, W, batch_size=16, seed=1)
    batch = next(iter(loader))
    assert batch["values"].shape == (16, W) and batch["values"].dtype == torch.float32
    assert batch["mask"].dtype == torch.float32
    values, mask = batch["values"].numpy(), batch["mask"].numpy()
    for row, m in zip(values, mask):
        observed = int(m.sum())
        assert np.all(m[W - observed:] == 1) and np.all(m[: W - observed] == 0)  # padding on the left only
        assert np.all(row[: W - observed] == 0)
        span = row[W - observed:]
        assert np.all(np.diff(span) == 1)  # one contiguous, in-order span of a single series


def test_windows_prefer_fully_observed_spans(corpus_dir):
    sampler = WindowSampler(read_corpus(corpus_dir), W, seed=3)
    batch = sampler.sample(0, 200)
    long_enough = sampler.lengths[batch.series] >= W
    assert np.all(batch.mask[long_enough] == 1)
    assert np.all(batch.mask[~long_enough].sum(1) == sampler.lengths[batch.series][~long_enough])


def test_same_seed_same_stream_other_seed_other_stream(corpus_dir):
    a = _take(CorpusLoader(corpus_dir, W, 8, seed=5), 4)
    _same(a, _take(CorpusLoader(corpus_dir, W, 8, seed=5), 4))
    b = _take(CorpusLoader(corpus_dir, W, 8, seed=6), 4)
    assert not all(torch.equal(x["values"], y["values"]) for x, y in zip(a, b))


@pytest.mark.parametrize("workers", [0, 1, 2])
def test_resume_mid_stream_yields_exactly_the_remaining_batches(corpus_dir, workers):
    kwargs = dict(seed=2, num_workers=workers, flip_probability=0.5, resample_probability=0.3,
                  resample_factors=(0.5, 1.5))
    reference = _take(CorpusLoader(corpus_dir, W, 8, **kwargs), 9)
    first = CorpusLoader(corpus_dir, W, 8, **kwargs)
    head = _take(first, 4)
    state = first.state_dict()
    assert state["batches_consumed"] == 4
    resumed = CorpusLoader(corpus_dir, W, 8, **kwargs)
    resumed.load_state_dict(state)
    _same(head + _take(resumed, 5), reference)


def test_worker_count_does_not_change_the_stream(corpus_dir):
    _same(_take(CorpusLoader(corpus_dir, W, 8, seed=4, num_workers=2), 5),
          _take(CorpusLoader(corpus_dir, W, 8, seed=4, num_workers=0), 5))


def test_ranks_are_disjoint_and_interleave_to_the_single_rank_stream(corpus_dir):
    sampler = WindowSampler(read_corpus(corpus_dir), W, seed=9)
    B, world = 4, 2
    single = _take(CorpusLoader(corpus_dir, W, B, seed=9), 8)
    ranks = [_take(CorpusLoader(corpus_dir, W, B, rank=r, world_size=world, seed=9), 4) for r in range(world)]
    for b in range(4):
        for r in range(world):
            assert torch.equal(ranks[r][b]["values"], single[b * world + r]["values"])
    # Over one epoch, the ranks' slots together visit every series exactly windows_per_series times.
    E = sampler.slots_per_epoch
    seen = [Counter(), Counter()]
    for r in range(world):
        slots = [s for b in range(E // (B * world) + 1)
                 for s in range((b * world + r) * B, (b * world + r + 1) * B) if s < E]
        seen[r].update(sampler.slot_series(np.array(slots)).tolist())
    total = seen[0] + seen[1]
    assert total == Counter({i: int(k) for i, k in enumerate(sampler.windows_per_series) if k})
    assert sum(seen[0].values()) + sum(seen[1].values()) == E


def test_feistel_permutation_is_a_bijection():
    for size in (1, 2, 7, 1000, 4097):
        out = feistel_permute(np.arange(size), size, key=123)
        assert sorted(out.tolist()) == list(range(size))
    assert not np.array_equal(feistel_permute(np.arange(100), 100, 1), feistel_permute(np.arange(100), 100, 2))


def test_mixture_weights_shift_the_domain_mix(corpus_dir):
    corpus = read_corpus(corpus_dir)
    plain = WindowSampler(corpus, W, seed=0)
    heavy = WindowSampler(corpus, W, seed=0, mixture_weights={"energy": 5.0, "src1": 0.0})
    domains = np.array(corpus.domain_names)[corpus.domain_codes]
    sources = np.array(corpus.source_names)[corpus.source_codes]
    assert heavy.windows_per_series[sources == "src1"].sum() == 0
    share = lambda s: s.windows_per_series[domains == "energy"].sum() / s.slots_per_epoch
    assert share(heavy) > share(plain) + 0.2
    with pytest.raises(InputError, match="mixture_weights.nope"):
        WindowSampler(corpus, W, mixture_weights={"nope": 1.0})


def test_flip_is_an_involution_and_flips_input_and_target_together(corpus_dir):
    x = np.random.default_rng(0).standard_normal((5, 16)).astype(np.float32)
    rows = np.array([True, False, True, True, False])
    np.testing.assert_array_equal(flip_sign(flip_sign(x.copy(), rows), rows), x)
    plain = _take(CorpusLoader(corpus_dir, W, 8, seed=1), 3)
    flipped = _take(CorpusLoader(corpus_dir, W, 8, seed=1, flip_probability=1.0), 3)
    for p, f in zip(plain, flipped):
        assert torch.equal(f["values"], -p["values"]) and torch.equal(f["mask"], p["mask"])


@pytest.mark.parametrize("out_points", [128, 512, 384])
def test_fourier_resampling_preserves_a_pure_sines_frequency(out_points):
    m, cycles = 256, 8
    t = np.arange(m)
    segment = np.sin(2 * np.pi * cycles * t / m)[None, :]
    y = fourier_resample(segment, out_points)[0]
    assert y.shape == (out_points,)
    spectrum = np.abs(np.fft.rfft(y))
    assert int(np.argmax(spectrum)) == cycles  # still 8 cycles over the same span of time
    expected = np.sin(2 * np.pi * cycles * np.arange(out_points) * (m / out_points) / m)
    assert np.corrcoef(y, expected)[0, 1] > 0.99
    assert np.max(np.abs(y - expected)) < 0.1


def test_resampling_keeps_a_linear_trend_exact():
    segment = (3.0 + 0.5 * np.arange(100))[None, :]
    y = fourier_resample(segment, 50)[0]
    np.testing.assert_allclose(y, 3.0 + 0.5 * np.arange(50) * 2, rtol=1e-5)


def test_resampled_windows_are_fully_observed_and_labelled(corpus_dir):
    sampler = WindowSampler(read_corpus(corpus_dir), W, seed=0, resample_probability=1.0, resample_factors=(2.0,))
    batch = sampler.sample(0, 64)
    resampled = batch.factor == 2.0
    assert resampled.any() and (~resampled).any()  # series shorter than 128 points keep their rate
    assert np.all(sampler.lengths[batch.series[resampled]] >= 2 * W)
    assert np.all(batch.mask[resampled] == 1)
    # Down-sampling a ramp by 2 gives a ramp of slope 2.
    np.testing.assert_allclose(np.diff(batch.values[resampled], axis=1), 2.0, atol=1e-2)


def test_make_loader_reads_the_data_config(corpus_dir):
    cfg = DataConfig(seed=3, num_workers=0, flip_probability=1.0, mixture_weights={"web": 2.0})
    loader = make_loader(cfg, corpus_dir, window_points=W, batch_size=4, rank=1, world_size=2)
    batch = next(iter(loader))
    assert batch["values"].shape == (4, W)
    state = loader.state_dict()
    assert state["rank"] == 1 and state["world_size"] == 2 and state["batches_consumed"] == 1


def test_state_from_another_layout_continues_after_consumed_slots(corpus_dir):
    old = CorpusLoader(corpus_dir, W, 4, rank=0, world_size=2, seed=0)
    _take(old, 3)  # both ranks consumed 3 batches of 4: 24 slots
    new = CorpusLoader(corpus_dir, W, 8, seed=0)
    new.load_state_dict(old.state_dict())
    sampler = new.sampler
    first = _take(new, 1)[0]
    np.testing.assert_array_equal(first["values"].numpy(), sampler.sample(24, 8).values)
    bad = dict(old.state_dict(), seed=99)
    with pytest.raises(InputError, match="seed=99"):
        new.load_state_dict(bad)


def test_a_window_does_not_depend_on_batch_size_or_rank(corpus_dir):
    """Augmented windows are keyed by slot: 4 ranks x batch 2 give the batch-8 stream exactly,
    which is what lets a checkpoint resume at another layout on the same data."""
    kwargs = dict(seed=3, flip_probability=0.5, resample_probability=0.5)
    single = _take(CorpusLoader(corpus_dir, W, 8, **kwargs), 2)
    ranks = [_take(CorpusLoader(corpus_dir, W, 2, rank=r, world_size=4, **kwargs), 2) for r in range(4)]
    for b in range(2):
        rebuilt = torch.cat([ranks[r][b]["values"] for r in range(4)])
        assert torch.equal(rebuilt, single[b]["values"])
    flips = sum(bool((batch["values"] < 0).any()) for batch in single)
    assert flips > 0  # the augmentation is active in this comparison


def test_truncated_windows_keep_a_suffix_of_the_same_window(corpus_dir):
    corpus = read_corpus(corpus_dir)
    plain = WindowSampler(corpus, W, seed=5).sample(0, 400)
    cut = WindowSampler(corpus, W, seed=5, truncate_probability=0.5, truncate_min_points=16).sample(0, 400)
    observed_plain, observed_cut = plain.mask.sum(1), cut.mask.sum(1)
    shortened = observed_cut < observed_plain
    # About half of the windows long enough to cut are cut, never below the minimum.
    assert 0.3 < shortened.mean() / (observed_plain > 16).mean() < 0.7
    assert observed_cut.min() >= min(16, observed_plain.min())
    # A truncated window is the plain window with its head masked and zeroed: same series,
    # same end, the other draws (start, flip, resampling) untouched.
    np.testing.assert_array_equal(cut.series, plain.series)
    np.testing.assert_array_equal(cut.values, plain.values * cut.mask)
    assert np.all(cut.mask <= plain.mask)
    for row in cut.mask[shortened]:
        first = int(np.argmax(row))
        assert np.all(row[:first] == 0) and np.all(row[first:] == 1)


def test_truncation_is_part_of_the_resume_layout(corpus_dir):
    old = CorpusLoader(corpus_dir, W, 4, seed=0, truncate_probability=0.3, truncate_min_points=8)
    _take(old, 2)
    resumed = CorpusLoader(corpus_dir, W, 4, seed=0, truncate_probability=0.3, truncate_min_points=8)
    resumed.load_state_dict(old.state_dict())
    _same(_take(resumed, 2), _take(old, 2))
    other = CorpusLoader(corpus_dir, W, 4, seed=0, truncate_probability=0.5, truncate_min_points=8)
    with pytest.raises(InputError, match="truncate_probability"):
        other.load_state_dict(old.state_dict())
    with pytest.raises(InputError, match="truncate_min_points"):
        WindowSampler(read_corpus(corpus_dir), W, truncate_min_points=W + 1)


def test_mixup_rows_blend_standardised_windows_of_the_corpus(tmp_path):
    rng = np.random.default_rng(3)
    walks = [np.cumsum(rng.standard_normal(200)).astype(np.float32) for _ in range(6)]
    write_corpus([SeriesRecord(f"w{i}", x, domain="web", source="walks") for i, x in enumerate(walks)], tmp_path)
    corpus = read_corpus(tmp_path)
    plain = WindowSampler(corpus, W, seed=2, flip_probability=0.3).sample(0, 200)
    mixed = WindowSampler(corpus, W, seed=2, flip_probability=0.3, mixup_probability=0.5,
                          mixup_max_series=2).sample(0, 200)
    changed = ~np.all(plain.values == mixed.values, axis=1)
    assert 0.35 < changed.mean() < 0.65
    # The other draws are untouched; every series is longer than W, so nothing gets masked.
    np.testing.assert_array_equal(mixed.series, plain.series)
    np.testing.assert_array_equal(mixed.flipped, plain.flipped)
    np.testing.assert_array_equal(mixed.mask, plain.mask)
    np.testing.assert_array_equal(mixed.values[~changed], plain.values[~changed])

    def z(x):
        return (x - x.mean()) / x.std()

    # Every standardised window of the corpus, flipped or not (the flip comes after the blend).
    bank = np.stack([sign * z(x[a:a + W].astype(np.float64)) for x in walks for a in range(len(x) - W + 1)
                     for sign in (1, -1)])
    for i in np.flatnonzero(changed)[:25]:
        x0 = plain.values[i].astype(np.float64)
        # blend = mean0 + std0 (w z0 + (1 - w) z1): z1 is one window of the corpus, w in (0, 1).
        d = (mixed.values[i] - x0.mean()) / x0.std() - z(x0)
        towards = bank - z(x0)
        share = towards @ d / (towards ** 2).sum(1).clip(1e-12)
        residual = np.abs(d[None] - share[:, None] * towards).max(1)
        best = int(np.argmin(residual))
        assert residual[best] < 1e-3 and 0 < share[best] < 1


def test_mixup_keeps_masks_level_and_spread_and_is_part_of_the_resume_layout(corpus_dir, tmp_path):
    corpus = read_corpus(corpus_dir)
    plain = WindowSampler(corpus, W, seed=4).sample(0, 300)
    mixed = WindowSampler(corpus, W, seed=4, mixup_probability=1.0, mixup_max_series=3).sample(0, 300)
    # Every series here is a ramp, so every standardised span is the same ramp: blending them and
    # putting the row's own mean and spread back gives the row itself. Masks stay the row's.
    np.testing.assert_array_equal(mixed.mask, plain.mask)
    np.testing.assert_allclose(mixed.values, plain.values, rtol=1e-5, atol=1e-2)
    # A flat row has no spread to put a blend back at: left as it is.
    flat = [SeriesRecord("flat", np.full(300, 7.0, np.float32), domain="web", source="flat")] + [
        SeriesRecord(f"w{i}", np.cumsum(np.random.default_rng(i).standard_normal(300)).astype(np.float32),
                     domain="web", source="walks")
        for i in range(3)]
    write_corpus(flat, tmp_path)
    flat_corpus = read_corpus(tmp_path)
    batch = WindowSampler(flat_corpus, W, seed=1, mixup_probability=1.0).sample(0, 200)
    rows = batch.series == 0
    assert rows.any() and np.all(batch.values[rows] == 7.0)
    assert not np.array_equal(batch.values[~rows], WindowSampler(flat_corpus, W, seed=1).sample(0, 200).values[~rows])

    old = CorpusLoader(corpus_dir, W, 4, seed=0, mixup_probability=0.3)
    _take(old, 2)
    resumed = CorpusLoader(corpus_dir, W, 4, seed=0, mixup_probability=0.3)
    resumed.load_state_dict(old.state_dict())
    _same(_take(resumed, 2), _take(old, 2))
    # A state saved without mixup (as before it existed) resumes only with it off, and the reverse.
    without = CorpusLoader(corpus_dir, W, 4, seed=0)
    state = without.state_dict()
    del state["mixup_probability"]
    CorpusLoader(corpus_dir, W, 4, seed=0).load_state_dict(state)
    with pytest.raises(InputError, match="mixup_probability"):
        CorpusLoader(corpus_dir, W, 4, seed=0, mixup_probability=0.3).load_state_dict(state)
    with pytest.raises(InputError, match="mixup_probability"):
        CorpusLoader(corpus_dir, W, 4, seed=0).load_state_dict(old.state_dict())
    with pytest.raises(InputError, match="mixup_max_series"):
        CorpusLoader(corpus_dir, W, 4, seed=0, mixup_probability=0.3, mixup_max_series=2).load_state_dict(
            old.state_dict())
    with pytest.raises(InputError, match="mixup_max_series"):
        WindowSampler(corpus, W, mixup_probability=0.5, mixup_max_series=1)
