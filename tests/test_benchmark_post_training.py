"""benchmarks/post_training_throughput.py --smoke: sft and GRPO through the distributed path (torchrun, gloo) at
N = 1 and 2 on tiny CPU shapes, so the one device call it is written for does not fail on a bug (issue 13). The
numbers are meaningless on a shared CPU; only their presence and range are checked.

Slow tier: ~50 s on 2 shared cores (two torchrun jobs, each training sft then GRPO)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import run_benchmark_smoke


@pytest.mark.slow
def test_post_training_throughput_smoke_writes_sft_and_grpo_figures_per_n(tmp_path: Path) -> None:
    out = tmp_path / "post_training_throughput-smoke.json"
    done = run_benchmark_smoke("post_training_throughput.py", out)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["complete"] and report["device"] == "cpu"
    assert {"command", "torch", "transformers", "shape"} <= set(report)
    assert [run["nproc"] for run in report["runs"]] == [1, 2]
    assert [run["engine"] for run in report["runs"]] == ["single-process", "ddp"]
    for run in report["runs"]:
        sft, grpo = run["sft"], run["grpo"]
        assert sft["tokens_per_s"] > 0 and 0 < sft["mfu"] < 1
        assert sft["global_batch_rows"] == 2 * run["nproc"] and sft["loss_first"] > 0  # assistant tokens in rows
        assert grpo["global_prompts"] == run["nproc"] and grpo["rollout_tokens_per_s"] > 0
        assert grpo["update_tokens_per_s"] > 0 and 0 < grpo["rollout_s"] < grpo["step_s"]
        assert len(grpo["steps"]) == report["timed_steps"]
    assert "N=2 GRPO: step" in done.stdout
