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

    stats = inspect_corpus(args.dir, args.plot, args.num_series, plot=not args.no_plot)
    if args.json:
        print(json.dumps(stats))
    else:
        print(format_stats(stats))
        if stats.get("png"):
            print(f"sample plot: {stats['png']}")
    return 0


def register(subparsers) -> None:
    data = subparsers.add_parser("data", help="build, validate and inspect training corpora",
                                 description="Build Parquet corpora (ingest + synthetic series + preprocessing), "
                                             "compile their memory-mapped training form, check and inspect them.",
                                 epilog="examples:\n"
                                        "  timers1 data build --config configs/data_default.yaml --out corpora/mine\n"
                                        "  timers1 data inspect")
    sub = data.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND",
                              help="one of the subcommands below")

    build = sub.add_parser("build", help="build a corpus from a build config (or the default corpus)",
                           description="Build a Parquet corpus from a build config (sources, synthetic "
                                       "series, preprocessing) or the built-in default corpus, and compile "
                                       "its training form; prints what was kept and dropped.",
                           epilog="examples:\n"
                                  "  timers1 data build --config configs/data_default.yaml --out corpora/mine\n"
                                  "  timers1 data build --default --out corpora/default --num-synthetic-series 2000")
    build.add_argument("--config", help="build config YAML (see configs/data_default.yaml)")
    build.add_argument("--out", help="output directory (overrides the config's output_dir)")
    build.add_argument("--default", action="store_true", help="build the no-download default corpus")
    build.add_argument("--num-synthetic-series", type=int, default=None, help="with --default (default: the size the trainer builds)")
    build.add_argument("--seed", type=int, default=0, help="seed of the synthetic series, with --default")
    build.add_argument("--overwrite", action="store_true", help="replace a corpus already in the output directory")
    build.add_argument("--workers", type=int, default=None,
                       help="processes reading and cleaning inputs (default: CPUs - 1, at most 8; 1 builds in this process); the corpus is the same for any number")
    build.add_argument("--no-compile", action="store_true",
                       help="write only the Parquet shards, not the memory-mapped training form (compile later)")
    build.set_defaults(func=_build)

    compile_ = sub.add_parser("compile", help="write the memory-mapped training form of a Parquet corpus",
                              description="Turn a Parquet corpus (a directory or a pyarrow.fs URI such as s3://bucket/corpus) "
                                          "into the memory-mapped form training reads: megatron-core IndexedDataset "
                                          "series.bin/series.idx plus per-series domain and source codes, recorded in the manifest.",
                              epilog="example:\n  timers1 data compile corpora/mine")
    compile_.add_argument("dir", help="corpus directory or URI")
    compile_.add_argument("--out", default=None, help="local or shared POSIX directory for the training form (default: DIR itself)")
    compile_.set_defaults(func=_compile)

    validate = sub.add_parser("validate", help="check manifest, shards and training form of a corpus",
                              description="Check a corpus: manifest, shard sizes, footers and index, and its "
                                          "training form; --deep also checks every hash and reads every value.",
                              epilog="example:\n  timers1 data validate corpora/mine --deep")
    validate.add_argument("dir", help="corpus directory or URI")
    validate.add_argument("--deep", action="store_true", help="also check every sha256 and read every value")
    validate.set_defaults(func=_validate)

    inspect = sub.add_parser("inspect", help="counts, length histogram, domain mix and a PNG of samples",
                             description="Summarise a corpus (series, points, length percentiles and histogram, "
                                         "mix by domain and source) and plot a random sample of its series; "
                                         "without DIR, the built-in corpus training uses (built first if needed).",
                             epilog="examples:\n"
                                    "  timers1 data inspect\n"
                                    "  timers1 data inspect corpora/mine --plot mine.png --num-series 6")
    inspect.add_argument("dir", nargs="?", default=None,
                         help="corpus directory or URI (default: the built-in corpus)")
    inspect.add_argument("--plot", "--png", metavar="PATH", default=None,
                         help="where to write the sample plot (default: samples.png in the corpus directory)")
    inspect.add_argument("--no-plot", action="store_true", help="statistics only, no plot")
    inspect.add_argument("--num-series", type=int, default=12, help="series in the sample plot")
    inspect.add_argument("--json", action="store_true", help="print the statistics as one JSON line")
    inspect.set_defaults(func=_inspect)
