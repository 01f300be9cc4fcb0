"""Data-parallel training under torchrun on CPU (gloo): N ranks equal one, checkpoints resume across N.

Each run is ``tests/distributed_train.py`` (a tiny Llama, 6 updates of a 4-row batch, a checkpoint every
3 updates uploaded to a store directory), started by ``python -m torch.distributed.run`` for 2 ranks and
as a plain process for 1.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from nemoforge.config import TrainConfig
from nemoforge.errors import NemoforgeError
from nemoforge.training.deepspeed_config import deepspeed_config, deepspeed_config_for
from nemoforge.training.distributed import DistContext, rank_rows

sys.path.insert(0, str(Path(__file__).parent))
from distributed_train import tiny_model  # noqa: E402

SCRIPT = Path(__file__).with_name("distributed_train.py")
TOL = 1e-5  # fp32: gradients averaged over ranks round differently from one mean over the batch


def _train(out: Path, *, nproc: int, store: Path, stop_at: int = -1, engine: str = "ddp") -> dict:
    out.mkdir(parents=True, exist_ok=True)
    script = [str(SCRIPT), "--store", str(store), "--work", str(out / "work"), "--out", str(out)]
    script += ["--stop-at", str(stop_at)]
    env = os.environ | {"NEMOFORGE_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1", "NEMOFORGE_DISTRIBUTED_ENGINE": engine}
    env.pop("WORLD_SIZE", None)
    if nproc == 1:
        cmd = [sys.executable, *script]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *script]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    crashed = stop_at >= 0
    assert (proc.returncode != 0) == crashed, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {} if crashed else json.loads((out / "result.json").read_text())


def _max_diff(a_dir: Path, b_dir: Path) -> float:
    a, b = load_file(str(a_dir / "params.safetensors")), load_file(str(b_dir / "params.safetensors"))
    assert sorted(a) == sorted(b)
    return max((a[k] - b[k]).abs().max().item() for k in a)


def _steps_in(path: Path) -> list[str]:
    return sorted(p.name for p in path.glob("step-*")) if path.is_dir() else []


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """The uninterrupted single-process run."""
    out = tmp_path_factory.mktemp("one-rank")
    return out, _train(out, nproc=1, store=out / "store")


def test_rank_rows_split_the_global_batch_in_rank_order():
    ids_BT = torch.arange(12).reshape(6, 2)
    halves = [rank_rows(ids_BT, DistContext(r, 2, r, "gloo")) for r in range(2)]
    assert halves[0].tolist() == [[0, 1], [2, 3], [4, 5]] and halves[1].tolist() == [[6, 7], [8, 9], [10, 11]]
    assert torch.equal(torch.cat([rank_rows(ids_BT, DistContext(r, 3, r, "gloo")) for r in range(3)]), ids_BT)
    with pytest.raises(NemoforgeError, match="batch_size=6 does not split over 4 ranks"):
        rank_rows(ids_BT, DistContext(0, 4, 0, "gloo"))


def test_deepspeed_config_keeps_the_recipe_batch_and_refuses_optimizer_and_scheduler(monkeypatch):
    from nemoforge.config import StageResources

    cfg = TrainConfig(steps=10, batch_size=16, warmup_steps=1, grad_clip_norm=0.5)
    built = deepspeed_config(cfg, StageResources(gpu_count=4))
    assert "optimizer" not in built and "scheduler" not in built  # the loop's AdamW and schedule are handed over
    monkeypatch.setenv("NEMOFORGE_DEEPSPEED_CONFIG", json.dumps(built))
    config = deepspeed_config_for(cfg, 4)
    assert "optimizer" not in config and "scheduler" not in config
    assert config["zero_optimization"]["stage"] == 3 and config["bf16"] == {"enabled": True}
    assert (config["train_batch_size"], config["train_micro_batch_size_per_gpu"]) == (16, 4)
    assert config["gradient_clipping"] == 0.5
    monkeypatch.setenv("NEMOFORGE_DEEPSPEED_CONFIG", json.dumps(built | {"optimizer": {"type": "AdamW"}}))
    with pytest.raises(NemoforgeError, match="NEMOFORGE_DEEPSPEED_CONFIG: optimizer given.*remove them"):
        deepspeed_config_for(cfg, 4)
    monkeypatch.setenv("NEMOFORGE_DEEPSPEED_CONFIG", json.dumps({"train_batch_size": 32}))
    with pytest.raises(NemoforgeError, match="train_batch_size=32 but the stage's batch_size=16"):
        deepspeed_config_for(cfg, 4)
    monkeypatch.setenv("NEMOFORGE_DEEPSPEED_CONFIG", json.dumps({"train_batch_size": 16, "gradient_accumulation_steps": 3}))
    with pytest.raises(NemoforgeError, match="batch_size=16 does not split over 4 ranks x 3 accumulation steps"):
        deepspeed_config_for(cfg, 4)
    monkeypatch.delenv("NEMOFORGE_DEEPSPEED_CONFIG")
    assert deepspeed_config_for(cfg, 4)["train_micro_batch_size_per_gpu"] == 4  # the stage default for N GPUs


def test_two_ranks_give_the_one_rank_parameters_and_only_rank_0_writes(tmp_path: Path, reference):
    ref_dir, ref = reference
    result = _train(tmp_path, nproc=2, store=tmp_path / "store")
    assert (result["world_size"], result["engine"], result["step"]) == (2, "ddp", 6)
    assert _max_diff(tmp_path, ref_dir) < TOL
    trained = load_file(str(ref_dir / "params.safetensors"))
    init = tiny_model().state_dict()
    assert max((trained[k] - init[k]).abs().max().item() for k in trained) > 100 * TOL  # training moved them
    assert result["rank_spread"] == 0.0  # DDP replicas stay bit-identical
    assert [v for _, v in result["loss"]] == pytest.approx([v for _, v in ref["loss"]], abs=TOL)
    assert ref["loss"][-1][1] < ref["loss"][0][1] - 0.1
    # rank 0 logged and uploaded; rank 1 wrote nothing: no callbacks, no checkpoint in its own directory
    calls = [json.loads(line) for line in (tmp_path / "calls-rank0.jsonl").read_text().splitlines()]
    assert [c["value"][0] for c in calls if c["kind"] == "log"] == [1, 2, 3, 4, 5, 6]
    assert [c["value"] for c in calls if c["kind"] == "checkpoint"] == ["step-3", "step-6"]
    assert not (tmp_path / "calls-rank1.jsonl").exists()
    assert _steps_in(tmp_path / "work" / "rank-1") == []
    assert _steps_in(tmp_path / "work" / "rank-0") == ["step-3", "step-6"]  # keep_checkpoints=2
    assert _steps_in(tmp_path / "store" / "checkpoints") == ["step-3", "step-6"]


def test_checkpoint_at_two_ranks_resumes_at_one(tmp_path: Path, reference):
    ref_dir, ref = reference
    store = tmp_path / "store"
    _train(tmp_path / "crash", nproc=2, store=store, stop_at=4)  # dies before update 5, after step-3
    assert _steps_in(store / "checkpoints") == ["step-3"]
    result = _train(tmp_path / "resume", nproc=1, store=store)
    assert (result["fetched_step"], result["resumed_from_step"], result["step"]) == (3, 3, 6)
    assert _max_diff(tmp_path / "resume", ref_dir) < TOL
    assert [v for _, v in result["loss"]] == pytest.approx([v for _, v in ref["loss"]], abs=TOL)


def test_checkpoint_at_one_rank_resumes_at_two(tmp_path: Path, reference):
    ref_dir, _ = reference
    store = tmp_path / "store"
    _train(tmp_path / "crash", nproc=1, store=store, stop_at=4)
    assert _steps_in(store / "checkpoints") == ["step-3"]
    result = _train(tmp_path / "resume", nproc=2, store=store)
    assert (result["world_size"], result["resumed_from_step"], result["step"]) == (2, 3, 6)
    assert _max_diff(tmp_path / "resume", ref_dir) < TOL
    assert not (tmp_path / "resume" / "calls-rank1.jsonl").exists()


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [2, 3])
def test_deepspeed_zero_on_gloo_resumes_a_one_rank_checkpoint_to_the_same_parameters(
    tmp_path: Path, reference, monkeypatch, zero_stage: int
):
    """ZeRO-2/3 in float32 (bf16 off, as on CPU) over 2 ranks: resume, save and the final gather of every weight.

    Never skipped: deepspeed is a test dependency (scripts/bootstrap.sh installs it with ``DS_BUILD_OPS=0``), and
    the engine relies on ZeRO internals that only this test checks.
    """
    assert importlib.util.find_spec("deepspeed"), "deepspeed is missing: bash scripts/bootstrap.sh test installs it"
    ref_dir, ref = reference
    store = tmp_path / "store"
    _train(tmp_path / "crash", nproc=1, store=store, stop_at=4)
    config = {"train_batch_size": 4, "bf16": {"enabled": False}, "zero_optimization": {"stage": zero_stage}}
    monkeypatch.setenv("NEMOFORGE_DEEPSPEED_CONFIG", json.dumps(config))
    result = _train(tmp_path / "resume", nproc=2, store=store, engine="deepspeed")
    assert (result["engine"], result["resumed_from_step"], result["step"]) == ("deepspeed", 3, 6)
    assert result["rank_spread"] == 0.0
    assert _max_diff(tmp_path / "resume", ref_dir) < TOL
    assert [v for _, v in result["loss"]] == pytest.approx([v for _, v in ref["loss"]], abs=TOL)
    # the checkpoint it wrote is the consolidated single-process layout: a 1-rank run loads it
    assert _steps_in(store / "checkpoints") == ["step-3", "step-6"]
    saved = torch.load(store / "checkpoints" / "step-6" / "state.pt", weights_only=False)
    assert saved["step"] == 6 and len(saved["optimizer"]["state"]) == len(list(tiny_model().parameters()))
    # the AdamW moments gathered from the ZeRO-3 partitions are the single-process run's (|exp_avg| <= ~0.05,
    # exp_avg_sq <= ~1e-4 here)
    ref_opt = torch.load(ref_dir / "store" / "checkpoints" / "step-6" / "state.pt", weights_only=False)["optimizer"]
    assert [g["params"] for g in saved["optimizer"]["param_groups"]] == [g["params"] for g in ref_opt["param_groups"]]
    for i, ref_state in ref_opt["state"].items():
        state = saved["optimizer"]["state"][i]
        assert float(state["step"]) == 6.0
        assert (state["exp_avg"] - ref_state["exp_avg"]).abs().max() < 1e-7
        assert (state["exp_avg_sq"] - ref_state["exp_avg_sq"]).abs().max() < 1e-9
