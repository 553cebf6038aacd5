"""Training data: corpus format, builder, preprocessing, synthetic generators, window loader.

Public API (see each module's docstring for the details):

- corpus:     ``write_corpus``, ``CorpusWriter``, ``read_corpus`` -> ``Corpus``, ``validate_corpus``,
              ``SeriesRecord``, ``CorpusError`` (Parquet: the build and interchange form)
- compiled:   ``compile_corpus``, ``open_compiled`` -> ``MappedCorpus`` (the memory-mapped training form)
- builder:    ``build_corpus(load_build_config(path))``, ``build_default_corpus(out_dir)``,
              ``ensure_default_corpus(cache_dir)`` (the no-download corpus the README trains on)
- loader:     ``make_loader(data_cfg, corpus_dir, window_points, batch_size, rank, world_size)``
              -> ``CorpusLoader``: iterate for {'values', 'mask'} float32 [B, W];
              ``state_dict()`` / ``load_state_dict()`` resume exactly; it never draws a held-out
              series; ``validation_windows(corpus, W, N)`` -> the fixed windows of those series,
              ``validation_sources`` -> their sources (real or synthetic), ``cut_context`` -> the
              same windows with a short context
- augment:    ``fourier_resample``, ``flip_sign``
- ingest:     ``read_long``, ``read_wide``, ``series_hash``, ``EVAL_DATASET_NAMES``

This package never imports the model, the engine or the trainer.
"""

import importlib

# Lazy (PEP 562): the builder's worker processes import this package to reach the builder and
# should not pay for torch, which only the loader needs.
_EXPORTS = {
    "flip_sign": "augment", "fourier_resample": "augment",
    "BuildConfig": "builder", "build_corpus": "builder", "build_default_corpus": "builder",
    "ensure_default_corpus": "builder", "load_build_config": "builder", "parse_build_config": "builder",
    "compile_corpus": "compiled", "open_compiled": "compiled", "MappedCorpus": "compiled",
    "Corpus": "corpus", "CorpusError": "corpus", "CorpusWriter": "corpus", "SeriesRecord": "corpus",
    "read_corpus": "corpus", "validate_corpus": "corpus", "write_corpus": "corpus",
    "EVAL_DATASET_NAMES": "ingest", "IngestError": "ingest", "read_long": "ingest", "read_wide": "ingest",
    "series_hash": "ingest",
    "CorpusLoader": "loader", "WindowSampler": "loader", "make_loader": "loader", "validation_windows": "loader",
    "validation_sources": "loader", "validation_real_windows": "loader", "cut_context": "loader",
    "observes_more_context": "loader",
    "PreprocessConfig": "preprocess", "clean_series": "preprocess",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'timers1.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f"timers1.data.{_EXPORTS[name]}"), name)
