"""FFN Fusion's decode speedup on a GPU, measured next to the cost model's prediction, in one run (issue 14).

    python benchmarks/ffn_fusion_gpu.py            # ~1.2B Llama-3.2-1B-shaped parent, bf16, on CUDA (~2 min, H100)
    python benchmarks/ffn_fusion_gpu.py --smoke    # tiny shapes on the CPU (~1 min): the same path but a fixed
                                                   # child (layers 1-2 and 4-5 attention-free), numbers meaningless

Needs torch, transformers, scipy (or highspy) and pydantic (nemoforge.config) with ``src`` on PYTHONPATH; the lent
GPU image lacks pydantic: carry the wheels of pydantic, pydantic-core, annotated-types, typing-inspection,
typing-extensions (as for benchmarks/nas_speedup.py, whose pieces this script imports).

1. Parent, block library and cost tables as in benchmarks/nas_speedup.py (steps 1-3: random-init Llama-3.2-1B
   shape in bf16; per layer attention {parent, no_op} x FFN {8192, 6144, 4096, 2048, 1024, no_op}; CUDA-event
   timing of every sub-block under ``generate``'s CUDA-graph decode step), one table per batch size (1, 32, 128),
   at 256 prompt + 256 new tokens: ``generate`` prefills in one unchunked forward, and the fused FFN (up to
   15 x 8192 = 122,880 channels) at batch 128 x 1024 prompt tokens would need ~32 GB per activation.
2. Child: the MIP's (``nemoforge.stages.nas.mip.search``) at latency budget 0.5x the parent's predicted decode
   step at batch 1, with nas_speedup's quality proxy (parameters removed; random weights have no meaningful KL),
   built by ``child_from_parent``. The same child is measured at every batch (one shipped model).
3. Fusion (FFN Fusion, arXiv 2503.18908; LN-Ultra §2): every maximal run of attention-free layers holding two or
   more FFNs (``fusion.attention_free_runs``) becomes one FFN of the summed width (``fusion.fuse_runs``). All
   runs: no KL selection, since random weights have no meaningful KL (speed only).
4. Prediction per batch, from that batch's cost table: ``CostTable.predicted_config(config).decode_ms`` of the
   unfused and the fused child, the code path the nas stage reports for an exported fused child
   (``child_decode_ms_fused``): a fused FFN's width was not measured and is read off the line through the measured
   widths (``CostTable.ffn_latency``; fusing k FFNs is predicted to save ``(k - 1) x`` the line's intercept,
   ``CostTable.fusion_saving``). Predicted speedup = predicted unfused step / predicted fused step.
5. Measured decode tokens/s of unfused and fused child as nas_speedup step 6: ``nemoforge.models.generate``
   (static KV cache, CUDA-graph decode step, greedy, no EOS); each round times ``generate`` for 256 and for 2 new
   tokens, tokens/s = batch x 254 / median difference; the two models round-robin, one untimed round first.

Prints per batch unfused and fused tokens/s, measured and predicted speedup and their relative error, and whether
the goals hold (fusion faster at batch 1 in every timed round; every |predicted / measured - 1| <= 15%); writes
benchmarks/results/ffn_fusion_gpu.json (device, versions, command, figures) after every batch.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from nas_speedup import (  # benchmarks/ is sys.path[0] when run as a script
    FULL,
    QUALITY_PROXY,
    RESULTS,
    SMOKE,
    Setup,
    build_parent,
    cost_summary,
    cost_table,
    decode_throughput,
    random_prompt,
    report_header,
    solve_children,
)

from nemoforge.config import NASConfig
from nemoforge.models.block_configs import count_params, summarize
from nemoforge.models.convert import child_from_parent
from nemoforge.models.hf.modeling_decilm import DeciLMForCausalLM
from nemoforge.stages.nas.cost import CostTable
from nemoforge.stages.nas.fusion import FusionRun, attention_free_runs, fuse_runs
from nemoforge.stages.nas.library import Variant, build_library

GOAL_RELATIVE_ERROR = 0.15  # issue 14: the prediction within 15%
CHOICE_BATCH = 1  # the child is the MIP's at this batch's cost table
# 256 prompt tokens: the fused FFN's unchunked prefill at batch 128 fits (module docstring, step 1).
FULL_FUSION = replace(FULL, prompt_tokens=256, repeats=5)
# Six layers: the smoke's fixed child has two attention-free runs of two FFNs to fuse.
SMOKE_FUSION = replace(SMOKE, llama={**SMOKE.llama, "num_hidden_layers": 6})


def fused_child(child: DeciLMForCausalLM) -> tuple[DeciLMForCausalLM, list[FusionRun]]:
    """``child`` with every attention-free run fused (module docstring, step 3), built on the child's device.

    Raises:
        SystemExit: the child has no run of two or more attention-free FFN layers (nothing to measure).
    """
    runs = attention_free_runs(child.config)
    if not runs:
        sys.exit(
            f"the child ({summarize(child.config.block_configs, child.config.hidden_size)}) has no run of two "
            "or more attention-free FFN layers: nothing to fuse"
        )
    with torch.device(child.device):  # fuse_runs builds the new model under the default device
        return fuse_runs(child, runs), runs


def run_batch(
    child: DeciLMForCausalLM, fused: DeciLMForCausalLM, runs: list[FusionRun], costs: CostTable, setup: Setup
) -> dict:
    """Predicted and measured decode of the unfused and the fused child at the cost table's batch: the JSON's
    figures for that batch."""
    batch = costs.measurement["batch_size"]
    models = {"unfused": child, "fused": fused}
    predicted_ms = {name: costs.predicted_config(model.config).decode_ms for name, model in models.items()}
    measured = decode_throughput(models, random_prompt(child, setup, batch), setup.new_tokens, setup.repeats)
    measured_speedup = measured["fused"]["decode_tokens_per_s"] / measured["unfused"]["decode_tokens_per_s"]
    predicted_speedup = predicted_ms["unfused"] / predicted_ms["fused"]
    intercept, slope = costs.ffn_line()
    return {
        "cost": {
            **cost_summary(costs),
            "ffn_line_decode": {"intercept_ms": intercept.decode_ms, "ms_per_channel": slope.decode_ms},
            "fusion_saving_decode_ms_per_merged_ffn": costs.fusion_saving().decode_ms,
            "runs": [
                {
                    "layers": f"{run.start}-{run.stop - 1}",
                    "unfused_ffns_decode_ms": sum(costs.ffn_latency(w).decode_ms for w in run.widths),
                    "fused_ffn_decode_ms": costs.ffn_latency(run.fused_width).decode_ms,
                }
                for run in runs
            ],
        },
        "models": {
            name: {
                "predicted_decode_step_ms": predicted_ms[name],
                **measured[name],
                "step_relative_error": predicted_ms[name] / measured[name]["decode_step_ms"] - 1.0,
            }
            for name in models
        },
        "measured_speedup": measured_speedup,
        "predicted_speedup": predicted_speedup,
        "relative_error": predicted_speedup / measured_speedup - 1.0,
        # every timed round of the fused child beat every timed round of the unfused one
        "fused_faster_every_round": max(measured["fused"]["decode_s_per_round"])
        < min(measured["unfused"]["decode_s_per_round"]),
    }


def model_summary(model: DeciLMForCausalLM) -> dict:
    """Layers, block configs in words and parameter count of a child, for the JSON."""
    config = model.config
    return {
        "num_layers": config.num_hidden_layers,
        "block_configs": summarize(config.block_configs, config.hidden_size),
        "params": count_params(config),
    }


def goals(report: dict) -> dict:
    """Issue 14's goals over the batches measured so far: fusion measurably faster at batch 1 (every timed round;
    None when batch 1 was not run) and every prediction of the speedup within 15%."""
    rows = report["batches"].values()
    largest = max(abs(row["relative_error"]) for row in rows)
    batch1 = report["batches"].get("1")
    return {
        "fused_faster_at_batch_1": None if batch1 is None else batch1["fused_faster_every_round"],
        "largest_relative_error": largest,
        "prediction_within_15_percent": largest <= GOAL_RELATIVE_ERROR,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (checks the path)")
    parser.add_argument("--batches", type=int, nargs="+", help="batch sizes (default: 1 32 128; smoke: 1 4)")
    parser.add_argument(
        "--budget", type=float, default=0.5, help=f"the child's latency budget ratio at batch {CHOICE_BATCH}"
    )
    parser.add_argument("--out", type=Path, help="default: benchmarks/results/ffn_fusion_gpu.json")
    args = parser.parse_args()
    setup = SMOKE_FUSION if args.smoke else FULL_FUSION
    if args.batches:
        setup = replace(setup, batches=args.batches)
    out_path = args.out or RESULTS / (
        "ffn_fusion_gpu-smoke.json.tmp" if args.smoke else "ffn_fusion_gpu.json"
    )
    if setup.device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: run on a GPU, or pass --smoke for the CPU check")

    started = time.perf_counter()
    parent = build_parent(setup)
    library = build_library(parent.config, NASConfig(ffn_intermediate_sizes=setup.ffn_sizes))
    costs = {CHOICE_BATCH: cost_table(parent, library, setup, CHOICE_BATCH)}
    if args.smoke:  # CPU timings are too noisy for the MIP to leave a run to fuse every time: a fixed child
        variants = [Variant(False, max(setup.ffn_sizes))] + [
            Variant(i % 3 != 0, min(setup.ffn_sizes)) for i in range(1, library.num_layers)
        ]
    else:
        variants = solve_children(library, costs[CHOICE_BATCH], [args.budget])[args.budget]
    with torch.device(parent.device):
        child = child_from_parent(parent, [library.block_config(v) for v in variants])
    fused, runs = fused_child(child)
    print(f"child and fusion: {time.perf_counter() - started:.1f} s", flush=True)
    report = {
        **report_header("ffn_fusion_gpu", setup, parent, library),
        "quality_proxy": QUALITY_PROXY,
        "child": {
            "latency_budget_ratio": None if args.smoke else args.budget,
            "chosen_at_batch": None if args.smoke else CHOICE_BATCH,
            **model_summary(child),
        },
        "fusion": {
            "selection": "every run of two or more attention-free FFN layers (random weights: no KL)",
            "runs": [
                {
                    "layers": f"{run.start}-{run.stop - 1}",
                    "ffn_layers": run.ffn_layers,
                    "widths": run.widths,
                    "fused_width": run.fused_width,
                    "fused_layer": run.fused_layer,
                }
                for run in runs
            ],
        },
        "fused": model_summary(fused),
        "prediction": "CostTable.predicted_config(config).decode_ms at each batch's cost table (a fused width on "
        "CostTable.ffn_line); predicted speedup = unfused / fused",
        "batches": {},
        "complete": False,
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    for batch in setup.batches:
        t = time.perf_counter()
        if batch not in costs:
            costs[batch] = cost_table(parent, library, setup, batch)
        report["batches"][str(batch)] = run_batch(child, fused, runs, costs[batch], setup)
        report["goals"] = goals(report)
        report["wall_time_s"] = time.perf_counter() - started
        report["complete"] = batch == setup.batches[-1]
        out_path.write_text(json.dumps(report, indent=2) + "\n")  # after every batch: a crash keeps the rest
        print(f"batch {batch}: {time.perf_counter() - t:.1f} s", flush=True)
    print_table(report)
    print(f"wrote {out_path} ({report['wall_time_s']:.0f} s)")


def print_table(report: dict) -> None:
    """Per batch: unfused and fused tokens/s, measured and predicted speedup, relative error; then the goals."""
    fusion = ", ".join(f"layers {r['layers']} -> ffn {r['fused_width']}" for r in report["fusion"]["runs"])
    child = report["child"]
    chosen = (
        f"@{child['latency_budget_ratio']}x (MIP at batch {child['chosen_at_batch']})"
        if child["chosen_at_batch"]
        else "fixed (smoke)"
    )
    print(
        f"\n{report['device']}; torch {report['versions']['torch']}\n"
        f"child {chosen}: {child['block_configs']}\n"
        f"fused: {fusion}; {report['child']['num_layers']} -> {report['fused']['num_layers']} layers"
    )
    print(
        f"{'batch':>5} {'unfused tok/s':>14} {'fused tok/s':>12} {'measured':>9} {'predicted':>9} {'rel err':>8}"
        f"  {'fused step ms measured / predicted':>34}"
    )
    for batch, row in report["batches"].items():
        unfused, fused = row["models"]["unfused"], row["models"]["fused"]
        print(
            f"{batch:>5} {unfused['decode_tokens_per_s']:>14.0f} {fused['decode_tokens_per_s']:>12.0f} "
            f"{row['measured_speedup']:>8.3f}x {row['predicted_speedup']:>8.3f}x "
            f"{100 * row['relative_error']:>+7.1f}%  {fused['decode_step_ms']:>23.3f} / {fused['predicted_decode_step_ms']:.3f}"
        )
    goal = report["goals"]
    faster = {True: "yes", False: "no", None: "not run"}[goal["fused_faster_at_batch_1"]]
    print(
        f"fusion faster at batch 1 in every timed round: {faster}; largest |predicted / measured speedup - 1|: "
        f"{100 * goal['largest_relative_error']:.1f}% (goal <= {100 * GOAL_RELATIVE_ERROR:.0f}%): "
        f"{'within' if goal['prediction_within_15_percent'] else 'NOT within'}"
    )


if __name__ == "__main__":
    main()
