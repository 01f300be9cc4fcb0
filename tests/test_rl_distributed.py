"""rl's training updates data-parallel under torchrun on CPU (gloo, DDP): 2 ranks equal 1.

Each run is ``tests/rl_ranks.py`` on the tiny random Llama of tests/conftest.py with the same global batch,
under ``torch.distributed.run`` for 2 ranks and as a plain process for 1.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

TOL = 1e-5  # fp32: gradients averaged over ranks round differently from one mean over the batch
SCRIPT = Path(__file__).with_name("rl_ranks.py")
pytestmark = pytest.mark.slow  # worker processes on 2 cores


def _ranks(nproc: int, out: Path, *args: str) -> tuple[dict, dict]:
    """Run ``rl_ranks.py`` on ``nproc`` ranks; rank 0's final parameters and history."""
    out.mkdir(parents=True)
    env = os.environ | {"NEMOFORGE_NO_PROGRESS": "1", "NEMOFORGE_DISTRIBUTED_ENGINE": "ddp", "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else []
    cmd = [sys.executable, *launcher, str(SCRIPT), *args, "--out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    return load_file(str(out / "params.safetensors")), json.loads((out / "history.json").read_text())


def _max_diff(a: dict, b: dict) -> float:
    assert sorted(a) == sorted(b)
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_two_rank_preference_pass_equals_one_rank(tiny_llama_dir: Path, shared_dir: Path, tmp_path: Path):
    """DPO + RPO's NLL on pairs of different lengths: each rank scores 2 of the 4 pairs of every update."""
    pairs = shared_dir / "data/instruct/llms_from_scratch_preference_data.jsonl"
    args = ("--phase", "preference", "--model", str(tiny_llama_dir), "--pairs", str(pairs))
    ref_w, ref_hist = _ranks(1, tmp_path / "one", *args)
    got_w, got_hist = _ranks(2, tmp_path / "two", *args)
    assert _max_diff(got_w, ref_w) < TOL
    init = load_file(str(tiny_llama_dir / "model.safetensors"))
    assert _max_diff({k: ref_w[k] for k in init}, init) > 100 * TOL  # training moved them
    for name in ("loss", "reward_accuracy", "reward_margin"):
        assert [v for _, v in got_hist[name]] == pytest.approx([v for _, v in ref_hist[name]], abs=TOL), name
    assert (tmp_path / "two" / "rank-1").is_dir()  # two ranks trained; rank 0 alone uploaded checkpoints
    assert sorted(p.name for p in (tmp_path / "two" / "store" / "checkpoints").iterdir()) == ["step-2", "step-3"]


def test_two_rank_grpo_step_on_fixed_rollouts_equals_one_rank(tiny_llama_dir: Path, tmp_path: Path):
    """Completions of 1-6 tokens: the ranks' token counts differ, so only a global token mean matches 1 rank."""
    args = ("--phase", "grpo", "--model", str(tiny_llama_dir))
    ref_w, ref_hist = _ranks(1, tmp_path / "one", *args)
    got_w, got_hist = _ranks(2, tmp_path / "two", *args)
    assert _max_diff(got_w, ref_w) < TOL
    init = load_file(str(tiny_llama_dir / "model.safetensors"))
    # training moved them (2 updates at lr 1e-3; a larger lr lets AdamW blow rounding up on gradients near its eps)
    assert _max_diff({k: ref_w[k] for k in init}, init) > 50 * TOL
    for name in ("loss", "kl", "clip_fraction", "frac_reward_zero_std", "completion_tokens"):
        assert [v for _, v in got_hist[name]] == pytest.approx([v for _, v in ref_hist[name]], abs=TOL), name
    assert ref_hist["frac_reward_zero_std"][0][1] < 1  # some group gives a policy-gradient signal
    assert (tmp_path / "two" / "rank-1").is_dir()

