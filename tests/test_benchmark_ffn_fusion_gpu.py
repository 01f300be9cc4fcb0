"""benchmarks/ffn_fusion_gpu.py --smoke: the GPU benchmark's whole path (cost tables, MIP child, fusion, decode
timing, prediction, table, JSON) on tiny CPU shapes, so the one device call it is written for does not fail on a
bug (issue 14). The numbers are meaningless on a shared CPU; only their presence and shape are checked.

Slow tier: ~22 s on 2 shared cores (a fresh process, its imports, two cost tables and 24 ``generate`` calls),
over the fast tier's 20 s per test."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import run_benchmark_smoke


@pytest.mark.slow
def test_ffn_fusion_gpu_smoke_prints_the_table_and_writes_the_json(tmp_path: Path) -> None:
    out = tmp_path / "ffn_fusion_gpu.json"
    done = run_benchmark_smoke("ffn_fusion_gpu.py", out)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "unfused tok/s" in done.stdout and "largest |predicted / measured speedup - 1|" in done.stdout
    report = json.loads(out.read_text())
    assert report["complete"] and list(report["batches"]) == ["1", "4"]
    runs = report["fusion"]["runs"]
    assert runs and all(run["fused_width"] == sum(run["widths"]) for run in runs)
    assert report["fused"]["num_layers"] < report["child"]["num_layers"]
    for row in report["batches"].values():
        assert set(row["models"]) == {"unfused", "fused"}
        assert row["predicted_speedup"] > 0 and row["relative_error"] == row["relative_error"]  # not NaN
        assert len(row["cost"]["runs"]) == len(runs)
    assert set(report["goals"]) == {
        "fused_faster_at_batch_1",
        "largest_relative_error",
        "prediction_within_15_percent",
    }
