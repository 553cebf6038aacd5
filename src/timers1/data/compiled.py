"""The training form of a corpus: megatron-core's memory-mapped IndexedDataset.

Parquet (corpus.py) is how a corpus is built, exchanged and archived: compressed, columnar,
readable by anything. Training needs something else: O(1) random access to any window of any
series without decompressing, one copy per node however many ranks read it, and a start-up
that reads an index rather than the values. ``compile_corpus`` writes that form beside the
shards (or into another local directory), one shard at a time, so it never holds the corpus:

    series.bin           every series' float32 values back to back (megatron-core .bin)
    series.idx           megatron-core index: per-series lengths (int32) and byte offsets
                         (int64); its "documents" are the Parquet shards
    series_domain.npy    int32 domain code per series                  }
    series_source.npy    int32 source code per series                  } memory-mapped
    series_split.npy     bool per series: held out for validation      } with numpy
                         (the builder's hash split; never trained on)

and records them in the manifest under ``compiled``: sizes, sha256s, the domain and source
names the codes index, the held-out series and points, and the fingerprint of the shards it was compiled from. Why megatron-core's
format rather than Arrow IPC: it is what Megatron users already have on their clusters (a corpus
tokenised for Megatron's GPT datasets is the same two files), its reader is a plain np.memmap
(page cache shared by every rank and DataLoader worker of a node, nothing private per series
but two index views), and its ``get(i, offset, length)`` is exactly a window read.

``open_compiled`` is what the trainer calls: it checks every compiled file's size and the
shards' sizes against the manifest, refuses a compiled form that was made from other shards,
and returns a ``MappedCorpus`` that the window sampler reads like an in-memory ``Corpus``.
Item ids, frequencies and start times stay in Parquet: the training path never needs them.
"""

from __future__ import annotations

import hashlib
import os
import time
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tqdm import tqdm

from timers1.data import storage
from timers1.data.corpus import (HELD_OUT_COLUMN, MANIFEST_NAME, CorpusError, check_file, corpus_fingerprint, file_sha256,
                                 held_out_of, read_checked_shard, read_manifest, write_manifest)

PREFIX = "series"
BIN_FILE, IDX_FILE = f"{PREFIX}.bin", f"{PREFIX}.idx"
DOMAIN_FILE, SOURCE_FILE = f"{PREFIX}_domain.npy", f"{PREFIX}_source.npy"
SPLIT_FILE = f"{PREFIX}_split.npy"
COMPILED_FILES = (BIN_FILE, IDX_FILE, DOMAIN_FILE, SOURCE_FILE, SPLIT_FILE)
COMPILED_FORMAT = "megatron-core IndexedDataset, float32"


def _megatron_indexed_dataset():
    """megatron-core's reader and writer, imported on first use, without its warnings about
    Transformer Engine and Apex (it does not need them here) and without ``megatron.core``'s
    package ``__init__``: that imports all of megatron (tensor parallelism, transformer layers,
    ``torch.compile`` of fused kernels, which loads dynamo and inductor), ~5 s of CPU in every
    training process and rank, for one module that needs only ``parallel_state`` and ``utils``.
    The packages stand in as bare namespaces for the import and are removed after it, so a
    later ``import megatron.core`` (``bench gpu``'s peer) runs the real one; if megatron's
    layout ever defeats this, the plain import is the fallback."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return _import_without_package_init("megatron.core", ("megatron.core.parallel_state",
                                                                  "megatron.core.datasets.indexed_dataset"))
        except ImportError:
            from megatron.core.datasets import indexed_dataset
            return indexed_dataset


def _import_without_package_init(package: str, modules: tuple[str, ...]):
    """Import ``modules`` (in order) with ``package`` and its subpackages on their path as bare
    modules, unless ``package`` is already imported; returns the last module."""
    import importlib
    import importlib.util
    import sys
    import types

    if package in sys.modules:
        return importlib.import_module(modules[-1])
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"{package} is not installed")
    root = list(spec.submodule_search_locations)[0]
    parents = {m.rsplit(".", 1)[0] for m in modules}
    stand_ins = {}
    for name in sorted(parents | {package}):
        module = types.ModuleType(name)
        module.__path__ = [os.path.join(root, *name.split(".")[len(package.split(".")):])]
        stand_ins[name] = sys.modules[name] = module
    loaded_before = set(sys.modules)
    try:
        for name in modules:
            module = importlib.import_module(name)
        return module
    except Exception as exc:
        for name in set(sys.modules) - loaded_before:  # this package's half-imported modules
            if name.startswith(package + "."):
                del sys.modules[name]
        raise ImportError(f"{modules[-1]} without {package}'s __init__: {exc}") from exc
    finally:
        for name, module in stand_ins.items():
            if sys.modules.get(name) is module:
                del sys.modules[name]


class _Codes:
    """Names -> dense int32 codes in first-seen order (what pc.dictionary_encode gives a whole
    corpus read at once, so both readers number domains and sources alike)."""

    def __init__(self):
        self.names: list[str] = []
        self._index: dict[str, int] = {}

    def encode(self, column: pa.ChunkedArray) -> np.ndarray:
        encoded = pc.dictionary_encode(column).combine_chunks()
        local = np.array([self._code(name) for name in encoded.dictionary.to_pylist()], dtype=np.int32)
        return local[encoded.indices.to_numpy(zero_copy_only=False)]

    def _code(self, name: str) -> int:
        if name not in self._index:
            self._index[name] = len(self.names)
            self.names.append(name)
        return self._index[name]


def compile_corpus(corpus_dir: str | Path, out_dir: str | Path | None = None,
                   progress: bool | None = None) -> dict:
    """Write the memory-mapped training form of a Parquet corpus; returns the manifest's
    ``compiled`` entry.

    ``corpus_dir`` may be a URI (s3://, gs://, hdfs://, file://); ``out_dir`` (default: the
    corpus directory itself, which must then be local) is a local or shared POSIX directory that
    receives the compiled files and a copy of the manifest. Files are written under temporary
    names and renamed before the manifest, which is replaced last: a crash never leaves a
    manifest that points at half-written files (a recompile first withdraws the old entry).
    """
    started = time.perf_counter()
    manifest = read_manifest(corpus_dir)
    if out_dir is None:
        if storage.is_uri(corpus_dir):
            raise CorpusError(f"{corpus_dir}: the training form is memory-mapped and must be local; "
                              f"give --out DIR (a local or shared POSIX directory)")
        out_dir = corpus_dir
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    indexed = _megatron_indexed_dataset()
    tmp = {name: out / f".{name}.partial" for name in COMPILED_FILES}
    num_rows = int(sum(entry.get("rows", 0) for entry in manifest["shards"]))
    builder = indexed.IndexedDatasetBuilder(str(tmp[BIN_FILE]), dtype=np.float32)
    domain_codes = np.lib.format.open_memmap(tmp[DOMAIN_FILE], mode="w+", dtype=np.int32, shape=(num_rows,))
    source_codes = np.lib.format.open_memmap(tmp[SOURCE_FILE], mode="w+", dtype=np.int32, shape=(num_rows,))
    held_out = np.lib.format.open_memmap(tmp[SPLIT_FILE], mode="w+", dtype=np.bool_, shape=(num_rows,))
    held_out_points = 0
    domains, sources = _Codes(), _Codes()
    bin_digest = hashlib.sha256()
    row = points = 0
    if progress is None:
        progress = os.isatty(2)
    bar = tqdm(total=int(manifest.get("num_points", 0)) or None, unit="pt", unit_scale=True,
               desc="compile", disable=not progress)
    try:
        for entry in manifest["shards"]:
            table, flat, lengths = read_checked_shard(corpus_dir, entry, ["domain", "source", HELD_OUT_COLUMN])
            end = row + len(lengths)
            if end > num_rows:
                raise CorpusError(f"{storage.join(corpus_dir, entry['file'])}: more rows than the manifest lists")
            # One megatron "document" per shard: its whole values in one write.
            builder.add_document(flat, lengths.tolist())
            bin_digest.update(np.ascontiguousarray(flat, dtype=np.float32).data)
            domain_codes[row:end] = domains.encode(table.column("domain"))
            source_codes[row:end] = sources.encode(table.column("source"))
            held_out[row:end] = shard_held_out = held_out_of(table)
            held_out_points += int(lengths[shard_held_out].sum())
            row, points = end, points + int(lengths.sum())
            bar.update(int(lengths.sum()))
        if row != num_rows:
            raise CorpusError(f"{storage.join(corpus_dir, MANIFEST_NAME)}: lists {num_rows} rows, shards hold {row}")
        builder.finalize(str(tmp[IDX_FILE]))
        for codes in (domain_codes, source_codes, held_out):
            codes.flush()
        held_out_series = int(np.count_nonzero(held_out))
        del domain_codes, source_codes, held_out, codes
        if manifest.pop("compiled", None) is not None and (out / MANIFEST_NAME).exists():
            # Recompiling in place: readers see "no training form" until the new one is whole.
            write_manifest(out, manifest)
        files = {}
        for name in COMPILED_FILES:
            digest = bin_digest.hexdigest() if name == BIN_FILE else file_sha256(tmp[name])
            files[name] = {"bytes": tmp[name].stat().st_size, "sha256": digest}
            os.replace(tmp[name], out / name)
    except BaseException:
        bar.close()
        for path in tmp.values():
            path.unlink(missing_ok=True)
        raise
    bar.close()
    compiled = {
        "format": COMPILED_FORMAT,
        "num_series": row,
        "num_points": points,
        "source_fingerprint": corpus_fingerprint(manifest),
        "domain_names": domains.names,
        "source_names": sources.names,
        "held_out_series": held_out_series,
        "held_out_points": held_out_points,
        "files": files,
        "seconds": round(time.perf_counter() - started, 2),
    }
    if Path(out).resolve() != (Path(corpus_dir).resolve() if not storage.is_uri(corpus_dir) else None):
        compiled["parquet_dir"] = str(corpus_dir)
    manifest["compiled"] = compiled
    write_manifest(out, manifest)
    return compiled


def check_compiled(corpus_dir: str | Path, manifest: dict, deep: bool = False) -> dict:
    """The manifest's ``compiled`` entry, after checking that every compiled file has the
    manifest's size (and sha256 and values equal to the shards' when ``deep``) and that the
    compiled form was made from the shards this manifest lists."""
    manifest_path = storage.join(corpus_dir, MANIFEST_NAME)
    compiled = manifest.get("compiled")
    if not isinstance(compiled, dict):
        raise CorpusError(f"{corpus_dir}: has no memory-mapped training form; "
                          f"run `timers1 data compile {corpus_dir}`")
    if compiled.get("format") != COMPILED_FORMAT or set(compiled.get("files", {})) != set(COMPILED_FILES):
        raise CorpusError(f"{manifest_path}: field 'compiled' is not a {COMPILED_FORMAT!r} entry listing "
                          f"{', '.join(COMPILED_FILES)}; run `timers1 data compile {corpus_dir}` again")
    if compiled.get("source_fingerprint") != corpus_fingerprint(manifest):
        raise CorpusError(f"{manifest_path}: the compiled form was made from other shards than the manifest "
                          f"lists now (shard hashes changed); run `timers1 data compile {corpus_dir}` again")
    for name in COMPILED_FILES:
        check_file(storage.join(corpus_dir, name), compiled["files"][name], verify_hash=deep)
    local = storage.local_path(corpus_dir)
    if deep and local is not None:  # remote compiled files cannot be mapped; their hashes were checked
        mapped = MappedCorpus(local, manifest)
        parquet_dir = compiled.get("parquet_dir", corpus_dir)
        row = 0
        for entry in manifest["shards"]:
            # A shard's series lie back to back in the .bin: one read from its first series.
            table, flat, lengths = read_checked_shard(parquet_dir, entry, [HELD_OUT_COLUMN])
            stored = mapped.window(row, 0, flat.size) if len(lengths) else flat[:0]
            if not np.array_equal(mapped.lengths[row:row + len(lengths)], lengths) or \
                    not np.array_equal(stored, flat):
                raise CorpusError(f"{storage.join(corpus_dir, BIN_FILE)}: values of shard {entry['file']} "
                                  f"(series {row}-{row + len(lengths) - 1}) differ from the Parquet shard")
            if not np.array_equal(mapped.held_out[row:row + len(lengths)], held_out_of(table)):
                raise CorpusError(f"{storage.join(corpus_dir, SPLIT_FILE)}: the validation split of shard "
                                  f"{entry['file']} (series {row}-{row + len(lengths) - 1}) differs from its "
                                  f"{HELD_OUT_COLUMN!r} column")
            row += len(lengths)
    return compiled


class MappedCorpus:
    """A compiled corpus, memory-mapped: what the window sampler reads during training.

    Same interface as the in-memory ``Corpus`` for the sampler (num_series, lengths, codes and
    names, ``held_out``, ``window``, fingerprint); private memory is the code views plus whatever
    index entries a process touches, whatever the corpus size.
    """

    def __init__(self, corpus_dir: str | Path, manifest: dict | None = None):
        local = storage.local_path(corpus_dir)
        if local is None:
            raise CorpusError(f"{corpus_dir}: the training form is memory-mapped and must be local; "
                              f"compile it with `timers1 data compile {corpus_dir} --out DIR` and train from DIR")
        self.directory = local
        self.manifest = manifest if manifest is not None else read_manifest(corpus_dir)
        compiled = self.manifest.get("compiled") or {}
        self.domain_names: list[str] = list(compiled.get("domain_names", []))
        self.source_names: list[str] = list(compiled.get("source_names", []))
        indexed = _megatron_indexed_dataset()
        prefix = str(self.directory / PREFIX)
        try:
            self._dataset = indexed.IndexedDataset(prefix, mmap=True)
            self.domain_codes = np.load(self.directory / DOMAIN_FILE, mmap_mode="r")
            self.source_codes = np.load(self.directory / SOURCE_FILE, mmap_mode="r")
            self.held_out = np.load(self.directory / SPLIT_FILE, mmap_mode="r")
        except (AssertionError, ValueError, OSError) as exc:
            raise CorpusError(f"{prefix}.idx/.bin: cannot be memory-mapped ({exc}); "
                              f"run `timers1 data compile` again") from None
        n = len(self._dataset)
        if n != compiled.get("num_series") or {len(self.domain_codes), len(self.source_codes), len(self.held_out)} != {n}:
            raise CorpusError(f"{prefix}.idx: holds {n} series, domain/source/split arrays "
                              f"{len(self.domain_codes)}/{len(self.source_codes)}/{len(self.held_out)}, "
                              f"manifest says {compiled.get('num_series')}")

    def __getstate__(self):
        # DataLoader workers started by spawn re-open the mapping instead of copying the arrays.
        return {"directory": self.directory, "manifest": self.manifest}

    def __setstate__(self, state):
        self.__init__(state["directory"], state["manifest"])

    @property
    def num_series(self) -> int:
        return len(self._dataset)

    @property
    def lengths(self) -> np.ndarray:
        return self._dataset.sequence_lengths

    @property
    def num_points(self) -> int:
        return int(self.manifest["compiled"]["num_points"])

    def window(self, index: int, start: int, length: int) -> np.ndarray:
        return self._dataset.get(int(index), int(start), int(length))

    def series(self, index: int) -> np.ndarray:
        return self._dataset[int(index)]

    @property
    def fingerprint(self) -> str:
        return corpus_fingerprint(self.manifest)


def open_compiled(corpus_dir: str | Path) -> MappedCorpus:
    """The training view of a corpus, after the cheap start-up checks (sizes, freshness); one
    clear CorpusError naming the file otherwise."""
    manifest = read_manifest(corpus_dir)
    check_compiled(corpus_dir, manifest)
    for entry in manifest["shards"]:
        # Shards are checked where they sit beside the compiled files (a stat each); a compiled
        # directory without its Parquet shards trains fine.
        path = storage.join(corpus_dir, entry["file"])
        if storage.file_size(path) is not None:
            check_file(path, entry)
    return MappedCorpus(corpus_dir, manifest)
