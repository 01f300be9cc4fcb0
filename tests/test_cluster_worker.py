"""The TrainJob worker under torchrun (2 ranks, CPU/gloo): rank 0 keeps the books, both ranks train."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_distill import put_child, put_corpus

from nemoforge.config import Recipe


def worker_env(recipe: Recipe, inputs: dict) -> dict[str, str]:
    """The environment a TrainJob pod gives ``nemoforge.cluster.worker`` (DDP on gloo, one thread per rank)."""
    return os.environ | {
        "NEMOFORGE_RECIPE_JSON": recipe.to_json(),
        "NEMOFORGE_INPUTS_JSON": json.dumps(inputs),
        "NEMOFORGE_NO_PROGRESS": "1",
        "NEMOFORGE_DISTRIBUTED_ENGINE": "ddp",
        "OMP_NUM_THREADS": "1",
    }


def _worker(recipe: Recipe, inputs: dict, run_name: str) -> subprocess.CompletedProcess:
    env = worker_env(recipe, inputs)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += ["-m", "nemoforge.cluster.worker", "--stage", "cpt", "--run-name", run_name]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_two_rank_worker_trains_once_and_only_rank_0_records(tiny_llama_dir: Path, shared_dir: Path, tmp_path: Path):
    from mlflow import MlflowClient

    from nemoforge.artifacts import open_store
    from nemoforge.runner.index import StepIndex
    from nemoforge.runner.stage_table import stage_key

    store = open_store(str(tmp_path / "store"))
    corpus_uri = put_corpus(store, shared_dir, tiny_llama_dir, tmp_path)
    model_uri = put_child(store, tiny_llama_dir, tmp_path)
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    recipe = Recipe(
        name="test",
        cpt={"steps": 4, "batch_size": 4, "lr": 2e-3, "warmup_steps": 1, "checkpoint_every_steps": 2,
             "heldout_sequences": 4},
        tracking={"mlflow_uri": tracking_uri},
        storage={"artifact_root": str(tmp_path / "store")},
    )  # fmt: skip
    inputs = {
        "model": {"uri": model_uri, "digest": store.digest(model_uri)},
        "corpus": {"uri": corpus_uri, "digest": store.digest(corpus_uri)},
    }

    proc = _worker(recipe, inputs, "run-1")
    assert proc.returncode == 0, proc.stderr[-4000:]
    entry = StepIndex(store, "cpt", stage_key(recipe, "cpt", inputs)).read()
    assert entry["state"] == "done" and entry["output_uri"] == store.join("run-1", "cpt")
    metrics = entry["result"]["metrics"]
    assert metrics["train_steps"] == 4 and metrics["train_tokens"] == 4 * 4 * 32  # the global batch, once
    assert metrics["loss_heldout_after"] < metrics["loss_heldout_before"]
    assert sorted(p.name for p in (tmp_path / "store" / "run-1" / "cpt" / "checkpoints").iterdir()) == [
        "step-2",
        "step-4",
    ]
    client = MlflowClient(tracking_uri=tracking_uri)
    experiment = client.get_experiment_by_name(recipe.tracking.experiment)
    runs = client.search_runs([experiment.experiment_id], "attributes.run_name = 'cpt'")
    assert len(runs) == 1 and runs[0].data.metrics["train_steps"] == 4  # one stage run: rank 0's

    # the same inputs again: rank 0 reuses the recorded result and rank 1 stops instead of training
    again = _worker(recipe, inputs, "run-2")
    assert again.returncode == 0, again.stderr[-4000:]
    assert not (tmp_path / "store" / "run-2").exists()
    runs = client.search_runs([experiment.experiment_id], "attributes.run_name = 'cpt'")
    assert sorted(r.data.tags.get("nemoforge.reused", "false") for r in runs) == ["false", "true"]


def test_worker_runs_every_trainjob_stage_and_no_other():
    from nemoforge.cluster.trainjob import TRAINING_STAGES
    from nemoforge.cluster.worker import main

    assert TRAINING_STAGES == ("distill", "cpt", "sft", "rl")  # rl: GRPO (+ DPO) across GPUs, issue 13 §3
    with pytest.raises(SystemExit) as err:
        main(["--stage", "nas", "--run-name", "r1"])
    assert err.value.code == 2  # argparse: not a choice
