"""Core subcommands: ``params`` (parameter counts on the meta device) and ``convert`` (HF <-> ours)."""

from __future__ import annotations

import argparse
from pathlib import Path


def _params(args: argparse.Namespace) -> int:
    from timers1.config import load_config
    from timers1.model.flops import count_params

    cfg = load_config(args.config, args.set)
    total, active = count_params(cfg.model, cfg.moe)
    print(f"total_params: {total}")
    print(f"active_params: {active}")
    return 0


def _convert(args: argparse.Namespace) -> int:
    from timers1 import hf
    from timers1.config import Config
    from timers1.forecast import load_model

    if bool(args.from_hf) == bool(args.to_hf):
        raise hf.CheckpointFormatError("give exactly one of --from-hf DIR or --to-hf")
    if args.from_hf:
        model_cfg, moe_cfg, state = hf.read_hf_dir(args.from_hf)
        hf.write_model_dir(args.out, Config(model=model_cfg, moe=moe_cfg), state)
        print(f"wrote {args.out} ({len(state)} tensors, timers1 layout)")
    else:
        if not args.checkpoint:
            raise hf.CheckpointFormatError("--to-hf needs --checkpoint DIR")
        cfg, model = load_model(args.checkpoint)
        state = model.state_dict()
        hf.write_hf_dir(args.out, cfg.model, cfg.moe, state)
        print(f"wrote {args.out} (released Hugging Face layout)")
    return 0


def register(sub) -> None:
    p = sub.add_parser("params", help="print total and active parameter counts of a config",
                       description="Print the total and active (per token) parameter counts of a config's "
                                   "model, computed on the meta device (no memory, any size).",
                       epilog="example:\n  timers1 params --config configs/small_cpu.yaml")
    p.add_argument("--config", type=Path, required=False, help="YAML config (default: the 8.3B flagship)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted override of a config field (e.g. moe.num_experts=16), repeatable")
    p.set_defaults(func=_params)

    p = sub.add_parser("convert", help="convert between the released HF checkpoint layout and ours",
                       description="Convert weights between the released Hugging Face layout of Timer-S1 "
                                   "and a timers1 model directory (config.yaml + model.safetensors).",
                       epilog="examples:\n"
                              "  timers1 convert --from-hf ~/timer_s1_hf --out models/timer_s1\n"
                              "  timers1 convert --to-hf --checkpoint runs/small_cpu --out exported_hf")
    p.add_argument("--from-hf", type=Path, help="released-layout directory to read")
    p.add_argument("--to-hf", action="store_true", help="write the released layout from --checkpoint")
    p.add_argument("--checkpoint", type=Path, help="our checkpoint directory (with --to-hf)")
    p.add_argument("--out", type=Path, required=True, help="directory to write")
    p.set_defaults(func=_convert)
