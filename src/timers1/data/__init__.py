"""Training data: corpus format, builder, preprocessing, synthetic generators, window loader.

Public API (see each module's docstring for the details):

- corpus:     ``write_corpus``, ``CorpusWriter``, ``read_corpus`` -> ``Corpus``, ``validate_corpus``,
              ``SeriesRecord``, ``CorpusError``
- builder:    ``build_corpus(load_build_config(path))``, ``build_default_corpus(out_dir)``,
              ``ensure_default_corpus(cache_dir)`` (the no-download corpus the README trains on)
- loader:     ``make_loader(data_cfg, corpus_dir, window_points, batch_size, rank, world_size)``
              -> ``CorpusLoader``: iterate for {'values', 'mask'} float32 [B, W];
              ``state_dict()`` / ``load_state_dict()`` resume exactly
- augment:    ``fourier_resample``, ``flip_sign``
- ingest:     ``read_long``, ``read_wide``, ``series_hash``, ``EVAL_DATASET_NAMES``

This package never imports the model, the engine or the trainer.
"""

from timers1.data.augment import flip_sign, fourier_resample
from timers1.data.builder import (BuildConfig, build_corpus, build_default_corpus, ensure_default_corpus,
                                  load_build_config, parse_build_config)
from timers1.data.corpus import (Corpus, CorpusError, CorpusWriter, SeriesRecord, read_corpus, validate_corpus,
                                 write_corpus)
from timers1.data.ingest import EVAL_DATASET_NAMES, IngestError, read_long, read_wide, series_hash
from timers1.data.loader import CorpusLoader, WindowSampler, make_loader
from timers1.data.preprocess import PreprocessConfig, clean_series

__all__ = [
    "BuildConfig", "Corpus", "CorpusError", "CorpusLoader", "CorpusWriter", "EVAL_DATASET_NAMES",
    "IngestError", "PreprocessConfig", "SeriesRecord", "WindowSampler", "build_corpus",
    "build_default_corpus", "clean_series", "ensure_default_corpus", "flip_sign", "fourier_resample",
    "load_build_config", "make_loader", "parse_build_config", "read_corpus", "read_long", "read_wide",
    "series_hash", "validate_corpus", "write_corpus",
]
