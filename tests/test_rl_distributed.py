"""rl's training updates data-parallel under torchrun on CPU (gloo, DDP): 2 ranks equal 1; the rl worker runs.

The phase runs are ``tests/rl_ranks.py`` on the tiny random Llama of tests/conftest.py with the same global batch,
under ``torch.distributed.run`` for 2 ranks and as a plain process for 1; the stage run is the TrainJob worker
(``python -m nemoforge.cluster.worker --stage rl``) on 2 ranks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import write_sft_data
from safetensors.torch import load_file
from test_cluster_worker import worker_env

from nemoforge.config import Recipe

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


def test_two_rank_rl_worker_completes_and_logs_one_mlflow_run(tiny_llama_dir: Path, shared_dir: Path, tmp_path: Path):
    from mlflow import MlflowClient

    from nemoforge.artifacts import open_store
    from nemoforge.runner.index import StepIndex
    from nemoforge.runner.stage_table import stage_key

    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    recipe = Recipe(
        name="test",
        data={"preference_uri": str(shared_dir / "data/instruct/llms_from_scratch_preference_data.jsonl")},
        rl={"steps": 2, "batch_size": 2, "num_generations": 2, "max_new_tokens": 4, "num_prompts": 4,
            "num_heldout_prompts": 1, "warmup_steps": 0, "filter_samples": 0, "beta": 0.01,
            "preference": {"enabled": True, "steps": 2, "batch_size": 2, "num_pairs": 4, "warmup_steps": 0,
                           "max_len_tokens": 96, "lr": 1e-3}},
        tracking={"mlflow_uri": tracking_uri},
        storage={"artifact_root": str(tmp_path / "store")},
    )  # fmt: skip
    store = open_store(str(tmp_path / "store"))
    data_uri = write_sft_data(recipe, store, store.join("run-0", "sft", "data"))
    inputs = {
        "model": {"uri": str(tiny_llama_dir), "digest": "tiny"},
        "data": {"uri": data_uri, "digest": store.digest(data_uri)},
    }
    env = worker_env(recipe, inputs)
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += ["-m", "nemoforge.cluster.worker", "--stage", "rl", "--run-name", "run-1"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]

    entry = StepIndex(store, "rl", stage_key(recipe, "rl", inputs)).read()
    assert entry["state"] == "done" and entry["output_uri"] == store.join("run-1", "rl")
    metrics = entry["result"]["metrics"]
    assert metrics["train_steps"] == 2 and metrics["preference_steps"] == 2 and "reward_heldout_after" in metrics
    out = tmp_path / "store" / "run-1" / "rl"
    assert (out / "checkpoints" / "step-2").is_dir() and (out / "checkpoints-preference" / "step-2").is_dir()
    assert (out / "model" / "model.safetensors").is_file()
    client = MlflowClient(tracking_uri=tracking_uri)
    experiment = client.get_experiment_by_name(recipe.tracking.experiment)
    runs = client.search_runs([experiment.experiment_id], "attributes.run_name = 'rl'")
    assert len(runs) == 1 and runs[0].data.metrics["train_steps"] == 2  # one stage run: rank 0's
    assert [m.step for m in client.get_metric_history(runs[0].info.run_id, "reward_mean")] == [1, 2]
