"""sft data-parallel under torchrun on CPU (gloo): 2 ranks equal 1, and a 2-rank checkpoint resumes on 1.

Every run is the TrainJob worker (``python -m nemoforge.cluster.worker --stage sft``), as on a cluster: under
``torch.distributed.run`` for 2 ranks (DDP) and as a plain process for 1, on the tiny random Llama of
tests/conftest.py with the same global batch (4 chats of generated arithmetic per update). Rows differ in their
assistant tokens, so the 2-rank run equals the 1-rank one only if the loss is the global batch's token mean.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file
from test_cluster_worker import worker_env

from nemoforge.config import Recipe

TOL = 1e-5  # fp32: gradients averaged over ranks round differently from one mean over the batch
pytestmark = pytest.mark.slow  # four worker processes (~1 min on 2 cores)


def _worker(recipe: Recipe, inputs: dict, run_name: str, *, nproc: int) -> None:
    env = worker_env(recipe, inputs)
    env.pop("WORLD_SIZE", None)
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else []
    cmd = [sys.executable, *launcher, "-m", "nemoforge.cluster.worker", "--stage", "sft", "--run-name", run_name]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]


def _recipe(tmp_path: Path) -> Recipe:
    return Recipe(
        name="test",
        sft={
            "steps": 4, "batch_size": 4, "lr": 1e-3, "warmup_steps": 1, "checkpoint_every_steps": 2,
            "seq_len_tokens": 96, "num_samples": 40, "heldout_sequences": 2, "num_toggle_prompts": 1,
            "max_new_tokens": 8,
        },
        tracking={"mlflow_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
        storage={"artifact_root": str(tmp_path / "store")},
    )  # fmt: skip


def _entry(recipe: Recipe, inputs: dict) -> tuple[Path, dict]:
    """The sft step's index file and its entry (what the launcher reads after the TrainJob)."""
    from nemoforge.artifacts import store_for
    from nemoforge.runner.index import StepIndex
    from nemoforge.runner.stage_table import stage_key

    key = stage_key(recipe, "sft", inputs)
    return Path(recipe.storage.artifact_root) / "index" / "sft" / f"{key}.json", StepIndex(
        store_for(recipe), "sft", key
    ).read()


def _weights(output_dir: Path) -> dict:
    return load_file(str(output_dir / "model" / "model.safetensors"))


def _max_diff(a: dict, b: dict) -> float:
    assert sorted(a) == sorted(b)
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_two_rank_sft_equals_one_rank_and_its_checkpoint_resumes_on_one(tiny_llama_dir: Path, tmp_path: Path):
    inputs = {"model": {"uri": str(tiny_llama_dir), "digest": "tiny"}}
    one, two = _recipe(tmp_path / "one"), _recipe(tmp_path / "two")

    _worker(one, inputs, "run-1", nproc=1)
    _worker(two, inputs, "run-1", nproc=2)
    (_, ref), (index_file, got) = _entry(one, inputs), _entry(two, inputs)
    ref_dir, out_dir = Path(ref["output_uri"]), Path(got["output_uri"])
    ref_w, got_w = _weights(ref_dir), _weights(out_dir)
    assert _max_diff(got_w, ref_w) < TOL
    assert _max_diff(ref_w, load_file(str(tiny_llama_dir / "model.safetensors"))) > 100 * TOL  # training moved them
    # the same metrics from rank 0 alone: losses per step, the global batch's assistant tokens, one export
    ref_hist, got_hist = ref["result"]["history"], got["result"]["history"]
    for name in ("loss", "assistant_tokens"):
        assert [v for _, v in got_hist[name]] == pytest.approx([v for _, v in ref_hist[name]], abs=TOL), name
    assert got["result"]["metrics"]["train_steps"] == 4 and got["result"]["metrics"]["loss_heldout_after"] == (
        pytest.approx(ref["result"]["metrics"]["loss_heldout_after"], abs=TOL)
    )
    assert sorted(p.name for p in (out_dir / "checkpoints").iterdir()) == ["step-2", "step-4"]
    assert (out_dir / "data").is_dir() and (out_dir / "samples" / "toggle_after.json").is_file()

    # resume across N: drop the finished step and its last checkpoint; one process resumes the 2-rank step-2
    index_file.unlink()
    shutil.rmtree(out_dir / "checkpoints" / "step-4")
    _worker(two, inputs, "run-1", nproc=1)
    _, resumed = _entry(two, inputs)
    assert resumed["output_uri"] == got["output_uri"] and resumed["result"]["tags"]["resumed_from_step"] == "2"
    assert _max_diff(_weights(out_dir), ref_w) < TOL
