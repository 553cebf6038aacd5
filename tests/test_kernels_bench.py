"""Smoke test of `timers1 bench kernels`: runs on a tiny shape and prints well-formed JSON lines."""

from __future__ import annotations

import json

from timers1.cli import main


def test_bench_kernels_json_lines(capsys, tmp_path):
    rc = main(["bench", "kernels", "--device", "cpu", "--tokens", "64", "--hidden", "32", "--experts", "4",
                             "--top-k", "2", "--expert-width", "16", "--repeats", "1",
                             "--profile", str(tmp_path)])
    assert rc == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    ops = {r["op"]: r for r in records}
    assert {"peak_matmul", "peak_memcpy", "route", "permute", "unpermute", "swiglu_experts"} <= set(ops)
    for name in ("route", "permute", "unpermute", "swiglu_experts"):
        assert ops[name]["ms"] > 0 and ops[name]["speedup_vs_ref"] > 0 and ops[name]["frac_of_peak"] > 0
    assert (tmp_path / "kernels_swiglu_experts.json").exists()
