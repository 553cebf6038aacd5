"""`timers1 data build|validate|inspect`."""

from __future__ import annotations

import json


def _build(args) -> int:
    from timers1.data.builder import build_corpus, build_default_corpus, format_summary, load_build_config

    if args.default:
        if not args.out:
            from timers1.errors import InputError
            raise InputError("data build --default: --out DIR is required")
        sizes = {"num_synthetic_series": args.num_synthetic_series} if args.num_synthetic_series else {}
        summary = build_default_corpus(args.out, seed=args.seed, overwrite=args.overwrite, progress=None,
                                       workers=args.workers, **sizes)
    else:
        if not args.config:
            from timers1.errors import InputError
            raise InputError("data build: give --config PATH (a build config) or --default")
        cfg = load_build_config(args.config)
        summary = build_corpus(cfg, args.out or None, progress=None, overwrite=args.overwrite,
                               workers=args.workers, compile=not args.no_compile)
    print(format_summary(summary))
    return 0


def _compile(args) -> int:
    from timers1.data.compiled import compile_corpus

    compiled = compile_corpus(args.dir, args.out, progress=None)
    print(f"compiled {args.out or args.dir}: {compiled['num_series']} series, {compiled['num_points']:,} points "
          f"({compiled['files']['series.bin']['bytes'] / 2**20:,.1f} MiB memory-mapped) in {compiled['seconds']} s")
    return 0


def _validate(args) -> int:
    from timers1.data.corpus import validate_corpus

    report = validate_corpus(args.dir, deep=args.deep)
    form = "with its training form" if report["compiled"] else "no training form (run `timers1 data compile`)"
    checks = "sizes, hashes and every value" if args.deep else "sizes, footers and index (--deep: hashes and values)"
    print(f"{args.dir}: ok: {report['rows']} series, {report['points']:,} points, {report['shards']} shard(s), "
          f"{form}; checked {checks}")
    return 0


def _inspect(args) -> int:
    from timers1.data.inspect import format_stats, inspect_corpus

    stats = inspect_corpus(args.dir, args.png, args.num_series)
    if args.json:
        print(json.dumps(stats))
    else:
        print(format_stats(stats))
        if stats.get("png"):
            print(f"sample plot: {stats['png']}")
    return 0


def register(subparsers) -> None:
    data = subparsers.add_parser("data", help="build, validate and inspect training corpora")
    sub = data.add_subparsers(dest="data_command", required=True)

    build = sub.add_parser("build", help="build a corpus from a build config (or the default corpus)")
    build.add_argument("--config", help="build config YAML (see configs/data_default.yaml)")
    build.add_argument("--out", help="output directory (overrides the config's output_dir)")
    build.add_argument("--default", action="store_true", help="build the no-download default corpus")
    build.add_argument("--num-synthetic-series", type=int, default=None, help="with --default (default: the size the trainer builds)")
    build.add_argument("--seed", type=int, default=0, help="with --default")
    build.add_argument("--overwrite", action="store_true", help="replace a corpus already in the output directory")
    build.add_argument("--workers", type=int, default=None,
                       help="processes reading and cleaning inputs (default: CPUs, at most 8); the corpus is the same for any number")
    build.add_argument("--no-compile", action="store_true",
                       help="write only the Parquet shards, not the memory-mapped training form (compile later)")
    build.set_defaults(func=_build)

    compile_ = sub.add_parser("compile", help="write the memory-mapped training form of a Parquet corpus",
                              description="Turn a Parquet corpus (a directory or a pyarrow.fs URI such as s3://bucket/corpus) "
                                          "into the memory-mapped form training reads: megatron-core IndexedDataset "
                                          "series.bin/series.idx plus per-series domain and source codes, recorded in the manifest.")
    compile_.add_argument("dir", help="corpus directory or URI")
    compile_.add_argument("--out", default=None, help="local or shared POSIX directory for the training form (default: DIR itself)")
    compile_.set_defaults(func=_compile)

    validate = sub.add_parser("validate", help="check manifest, shards and training form of a corpus")
    validate.add_argument("dir", help="corpus directory or URI")
    validate.add_argument("--deep", action="store_true", help="also check every sha256 and read every value")
    validate.set_defaults(func=_validate)

    inspect = sub.add_parser("inspect", help="counts, length histogram, domain mix and a PNG of samples")
    inspect.add_argument("dir")
    inspect.add_argument("--png", default="corpus_samples.png", help="where to write the sample plot ('' for none)")
    inspect.add_argument("--num-series", type=int, default=12)
    inspect.add_argument("--json", action="store_true", help="print the statistics as one JSON line")
    inspect.set_defaults(func=_inspect)
