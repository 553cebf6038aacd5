"""Multi-process parity of the distributed engine (gloo on CPU, real collectives, no mocks).

Each scenario spawns 2 or 4 ranks with torchrun; every rank compares the engine's loss and
every parameter gradient (gathered from its DTensor shards) with the single-process model
on the global batch (``tests/_parallel_worker.py``), and checks DCP state dicts. Tolerance
1e-5 (fp32); measured differences are ~1e-8.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from timers1.parallel import LayoutError, ParallelDims

HERE = Path(__file__).resolve().parent
TOL = 1e-5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_scenario(scenario: str, nproc: int, tmp_path: Path, losses: str = "recipes") -> dict:
    out = tmp_path / f"{scenario}_{losses}.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           f"--master_port={_free_port()}", str(HERE / "_parallel_worker.py"), scenario, losses, str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        errors = [line for line in (proc.stdout + proc.stderr).splitlines() if "Error" in line or "error" in line]
        pytest.fail(f"{scenario} failed (rc={proc.returncode}):\n" + "\n".join(errors[-15:])
                    + "\n--- stderr tail ---\n" + proc.stderr[-3000:])
    return json.loads(out.read_text())


@pytest.mark.parametrize("scenario,nproc,losses", [
    ("fsdp2", 2, "recipes"),
    ("ep2", 2, "recipes"),
    ("tp2", 2, "recipes"),
    ("pp2_1f1b", 2, "recipes"),
    ("pp2_1f1b", 2, "paper"),
    ("pp2_interleaved", 2, "recipes"),
    ("tp2_ep2_ac", 2, "recipes"),
    ("tp2_ep2_ac", 2, "paper"),
    ("pp2_ac", 2, "recipes"),
    ("dp2_ep2", 4, "recipes"),
    ("hsdp2_ep2", 4, "recipes"),
    ("tp2_pp2", 4, "recipes"),
])
def test_parity_with_single_process(scenario, nproc, losses, tmp_path):
    """Loss and every gradient equal one process on the global batch, with the recipes' loss
    options (series_scale, 1/sqrt(j) STP weights, aux and z losses) and with the paper's."""
    result = run_scenario(scenario, nproc, tmp_path, losses)
    assert result["grad_max_abs_diff"] <= TOL, result
    assert result["loss_abs_diff"] <= TOL, result
    assert result["params_checked"] > 0 and result["state_dict_keys_rank0"] > 0


def test_rank_whose_experts_receive_no_tokens(tmp_path):
    """Router forced away from the last EP rank's experts: it gets zero rows, zero gradients,
    every collective still matches, and the result equals the single-process model."""
    result = run_scenario("ep2_zero_tokens", 2, tmp_path)
    assert result["grad_max_abs_diff"] <= TOL and result["loss_abs_diff"] <= TOL, result
    per_rank = result["expert_grad_absmax_per_rank"]
    assert per_rank[0] > 0 and per_rank[1] == 0.0, per_rank


@pytest.mark.parametrize("kwargs,needle", [
    (dict(world_size=4, tp=3), "parallel.dp_shard=-1 cannot be inferred"),
    (dict(world_size=4, dp_shard=3), "!= world size 4"),
    (dict(world_size=4, dp_shard=2, tp=2, ep=3), "parallel.ep=3: must divide dp_shard*tp"),
    (dict(world_size=2, dp_replicate=0), "parallel.dp_replicate=0"),
])
def test_invalid_layout_names_the_field(kwargs, needle):
    with pytest.raises(LayoutError, match=None) as exc:
        ParallelDims(**kwargs)
    assert needle in str(exc.value)


def test_invalid_layout_against_model():
    dims = ParallelDims(world_size=8, dp_shard=8, ep=8)
    with pytest.raises(LayoutError, match=r"parallel.ep=8: must divide moe.num_experts=4"):
        dims.check_model(num_experts=4, num_heads=4, hidden_size=64, num_blocks=4)
    dims = ParallelDims(world_size=8, dp_shard=1, tp=8)
    with pytest.raises(LayoutError, match=r"parallel.tp=8: must divide model.num_heads=4"):
        dims.check_model(num_experts=4, num_heads=4, hidden_size=64, num_blocks=4)
    dims = ParallelDims(world_size=4, dp_shard=1, pp=4)
    with pytest.raises(LayoutError, match=r"needs 8 stages but the model has only 4 blocks"):
        dims.check_model(num_experts=4, num_heads=4, hidden_size=64, num_blocks=4, pp_schedule="interleaved_1f1b",
                         pp_microbatches=4)
