"""Puzzle's predicted decode speedup next to the one measured with nemoforge's decoder, in one run (issue 7, item 4).

    python benchmarks/nas_speedup.py            # ~1.2B Llama-3.2-1B-shaped parent, bf16, on CUDA (~2-3 min, H200)
    python benchmarks/nas_speedup.py --smoke    # tiny shapes on the CPU (~1 min): the same path, numbers meaningless

Needs torch, transformers, scipy and pydantic (nemoforge.config) with ``src`` on PYTHONPATH; the lent H200 image
lacks pydantic: carry the wheels of pydantic, pydantic-core, annotated-types, typing-inspection, typing-extensions.

1. Parent: a random-init Llama-shaped ``DeciLMForCausalLM`` (hidden 2048, 16 layers, FFN 8192, 32 query / 8 KV
   heads, vocab 128256, tied embeddings: Llama-3.2-1B's shape, 1.24B parameters) in bf16 on the GPU.
2. Block library (Puzzle §2): per layer attention {parent GQA, no_op} (layer 0 keeps it) x FFN {8192, 6144,
   4096, 2048, 1024, no_op}.
3. Cost table per batch size (Puzzle §4.1, ``nemoforge.stages.nas.cost.measure_costs``): per sub-block shape,
   prefill and decode latency on this GPU at that batch, 1024 prompt tokens + 256 new: CUDA events, warm-up,
   median of repeats; decode as ``generate`` runs it (the fixed-shape step over 1280 cache slots, one CUDA-graph
   replay per call), the greedy pick and the step's input copies in the fixed part.
4. MIP (Puzzle §4.2, ``nemoforge.stages.nas.mip.search``) per batch size and latency budget (0.7x and 0.5x the
   parent's predicted decode step): the latency row is the decode-step latency at that batch (the batch is not
   a MIP variable; Puzzle solves once per batch). Quality proxy, since a random-init parent has no meaningful
   KL: the parameters a variant removes, as a fraction of one parent layer's, summed over layers and minimized,
   so the MIP keeps as many parameters as the budget allows. Only the speed claim is measured here.
5. Children: ``child_from_parent`` (our heterogeneous DeciLM, no tensors for removed sub-blocks).
6. Decode throughput of parent and children at that batch with ``nemoforge.models.generate.generate`` (static KV
   cache, decode step replayed as a CUDA graph, greedy, no EOS): each round times ``generate`` for 256 and for 2
   new tokens (CUDA-synchronized wall clock); both pay the same prefill and graph capture, so the difference is
   254 decode steps. tokens/s = batch x 254 / median difference; models are timed round-robin.

Prints measured and predicted speedups side by side with the relative error, and writes
benchmarks/results/nas_speedup.json (device, versions, command, figures).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

import scipy
import torch
import transformers
from transformers import LlamaConfig

from nemoforge.config import CostConfig, NASConfig
from nemoforge.models.block_configs import count_params, kv_cache_bytes_per_token, summarize
from nemoforge.models.convert import child_from_parent, decilm_config_from_llama
from nemoforge.models.generate import generate
from nemoforge.models.hf.modeling_decilm import DeciLMForCausalLM
from nemoforge.stages.nas.cost import CostTable, device_name, measure_costs
from nemoforge.stages.nas.library import BlockLibrary, Variant, build_library
from nemoforge.stages.nas.mip import Option, search

RESULTS = Path(__file__).parent / "results"
QUALITY_PROXY = (
    "parameters removed: 1 - param_bytes(variant) / param_bytes(parent layer), summed over layers and minimized "
    "(random-init parent: no meaningful KL; the speed claim is what this benchmark measures)"
)
SHORT_NEW_TOKENS = 2  # the reference run: prefill + graph capture + 1 decode step


@dataclass(frozen=True)
class Setup:
    """Shapes of one benchmark mode."""

    llama: dict
    ffn_sizes: list[int]
    batches: list[int]
    prompt_tokens: int
    new_tokens: int
    dtype: torch.dtype
    device: str
    cost_repeats: int
    repeats: int


FULL = Setup(
    llama=dict(
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=2048,
        rope_theta=500000.0,
        tie_word_embeddings=True,
    ),
    ffn_sizes=[6144, 4096, 2048, 1024],
    batches=[1, 32, 128],
    prompt_tokens=1024,
    new_tokens=256,
    dtype=torch.bfloat16,
    device="cuda",
    cost_repeats=5,
    repeats=3,
)
SMOKE = Setup(
    llama=dict(
        vocab_size=2048,
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rope_theta=10000.0,
        tie_word_embeddings=True,
    ),
    ffn_sizes=[256],
    batches=[1, 4],
    prompt_tokens=32,
    new_tokens=8,
    dtype=torch.float32,
    device="cpu",
    cost_repeats=2,
    repeats=2,
)


def build_parent(setup: Setup) -> DeciLMForCausalLM:
    """The random-init all-parent model (normal(0, 0.02) weights) in the setup's dtype, on its device."""
    config = decilm_config_from_llama(LlamaConfig(**setup.llama))
    torch.manual_seed(0)
    with torch.device(setup.device):
        return DeciLMForCausalLM(config).to(setup.dtype).eval()


def mip_options(library: BlockLibrary, costs: CostTable) -> list[list[Option]]:
    """Per layer, per variant: the quality proxy (as ``kl_div``), decode-step latency (ms), parameter + KV bytes."""
    parent_bytes = costs.param_bytes(library.parent)
    return [
        [
            Option(
                kl_div=1.0 - costs.param_bytes(v) / parent_bytes,
                latency_ms=costs.latency(v).decode_ms,
                memory_bytes=costs.param_bytes(v) + costs.kv_cache_bytes(v),
            )
            for v in row
        ]
        for row in library.variants
    ]


def solve_children(
    library: BlockLibrary, costs: CostTable, budgets: list[float]
) -> dict[float, list[Variant]]:
    """Per latency budget ratio, the MIP's child (one variant per layer) at this cost table's batch."""
    options = mip_options(library, costs)
    parent_choice = [row.index(library.parent) for row in library.variants]
    children = {}
    for ratio in budgets:
        (solution,) = search(
            options,
            parent_choice=parent_choice,
            fixed_latency_ms=costs.fixed.decode_ms,
            fixed_memory_bytes=costs.fixed_param_bytes,
            latency_budget_ratio=ratio,
            memory_budget_gib=None,
            num_solutions=1,
            min_diversity_layers=1,
            time_limit_s=30.0,
        )
        children[ratio] = [library.variants[i][j] for i, j in enumerate(solution.choice)]
    return children


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _generate_s(model: DeciLMForCausalLM, prompt_BT: torch.Tensor, new_tokens: int) -> float:
    """Wall seconds of one ``generate`` call, the device synchronized before and after."""
    _sync(prompt_BT.device)
    started = time.perf_counter()
    generate(model, prompt_BT, new_tokens)
    _sync(prompt_BT.device)
    return time.perf_counter() - started


def decode_throughput(
    models: dict[str, DeciLMForCausalLM], prompt_BT: torch.Tensor, new_tokens: int, repeats: int
) -> dict[str, dict[str, float]]:
    """Per model: decode tokens/s (the difference method of the module docstring) and end-to-end tokens/s.

    One untimed round first (allocator, kernels' first launch); then ``repeats`` rounds, each timing every model
    once in turn.
    """
    B = prompt_BT.shape[0]
    decode_steps = new_tokens - SHORT_NEW_TOKENS
    full: dict[str, list[float]] = {name: [] for name in models}
    diff: dict[str, list[float]] = {name: [] for name in models}
    for round_idx in range(1 + repeats):
        for name, model in models.items():
            full_s = _generate_s(model, prompt_BT, new_tokens)
            short_s = _generate_s(model, prompt_BT, SHORT_NEW_TOKENS)
            if round_idx:
                full[name].append(full_s)
                diff[name].append(full_s - short_s)
    out = {}
    for name in models:
        decode_s = statistics.median(diff[name])
        out[name] = {
            "decode_tokens_per_s": B * decode_steps / decode_s,
            "decode_step_ms": 1e3 * decode_s / decode_steps,
            "end_to_end_tokens_per_s": B * new_tokens / statistics.median(full[name]),
            "generate_s_median": statistics.median(full[name]),
            "decode_s_per_round": diff[name],
        }
    return out


def versions() -> dict[str, str]:
    """Python, torch, CUDA, transformers and scipy versions and the checkout's commit, for a results JSON."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": str(torch.version.cuda),
        "transformers": transformers.__version__,
        "scipy": scipy.__version__,
        "nemoforge_commit": commit,
    }


def cost_table(parent: DeciLMForCausalLM, library: BlockLibrary, setup: Setup, batch: int) -> CostTable:
    """The cost model's table (``measure_costs``, module docstring step 3) at one batch size."""
    return measure_costs(
        parent,
        library,
        CostConfig(
            batch_size=batch,
            prefill_tokens=setup.prompt_tokens,
            decode_tokens=setup.new_tokens,
            repeats=setup.cost_repeats,
        ),
    )


def cost_summary(costs: CostTable) -> dict:
    """A cost table's profile and decode-step figures (ms) for a results JSON."""
    return {
        "measurement": costs.measurement,
        "fixed_decode_ms": costs.fixed.decode_ms,
        "attention_decode_ms_per_layer": costs.attention.decode_ms,
        "ffn_decode_ms_per_layer": {str(w): lat.decode_ms for w, lat in costs.ffn.items()},
    }


def random_prompt(model: DeciLMForCausalLM, setup: Setup, batch: int) -> torch.Tensor:
    """``batch`` rows of ``setup.prompt_tokens`` uniform random token ids on the model's device (seeded by batch)."""
    generator = torch.Generator(model.device).manual_seed(batch)
    return torch.randint(
        model.config.vocab_size, (batch, setup.prompt_tokens), generator=generator, device=model.device
    )


def report_header(benchmark: str, setup: Setup, parent: DeciLMForCausalLM, library: BlockLibrary) -> dict:
    """The part of a results JSON common to the benchmarks on this parent: command, date, device, versions,
    parent and library shapes, decode engine and throughput method, prompt and new tokens."""
    return {
        "benchmark": benchmark,
        "command": " ".join(["python", *sys.argv]),
        "date_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "device": device_name(parent.device),
        "versions": versions(),
        "parent": {
            **setup.llama,
            "params": count_params(parent.config),
            "dtype": str(setup.dtype).removeprefix("torch."),
        },
        "library": {
            "attention": ["parent", "no_op (not layer 0)"],
            "ffn_intermediate_sizes": [library.parent_ffn_size, *library.ffn_sizes, 0],
        },
        "engine": "nemoforge.models.generate.generate: static KV cache, decode step replayed as a CUDA graph "
        "(on CUDA), greedy, no EOS",
        "throughput_method": f"decode tokens/s = batch x {setup.new_tokens - SHORT_NEW_TOKENS} / median over "
        f"rounds of [t(generate {setup.new_tokens} new) - t(generate {SHORT_NEW_TOKENS} new)]",
        "prompt_tokens": setup.prompt_tokens,
        "new_tokens": setup.new_tokens,
    }


def run_batch(
    parent: DeciLMForCausalLM, library: BlockLibrary, setup: Setup, batch: int, budgets: list[float]
) -> dict:
    """Cost table, MIP children and measured throughput at one batch size; the figures for the JSON."""
    device = parent.device
    costs = cost_table(parent, library, setup, batch)
    parent_variants = [library.parent] * library.num_layers
    predicted_parent_ms = costs.predicted(parent_variants).decode_ms
    chosen = solve_children(library, costs, budgets)
    models = {"parent": parent}
    with torch.device(device):
        for ratio, variants in chosen.items():
            models[f"child@{ratio}"] = child_from_parent(parent, [library.block_config(v) for v in variants])
    measured = decode_throughput(models, random_prompt(parent, setup, batch), setup.new_tokens, setup.repeats)

    rows = {}
    for name, model in models.items():
        variants = parent_variants if name == "parent" else chosen[float(name.split("@")[1])]
        predicted_ms = costs.predicted(variants).decode_ms
        predicted_speedup = predicted_parent_ms / predicted_ms
        measured_speedup = measured[name]["decode_tokens_per_s"] / measured["parent"]["decode_tokens_per_s"]
        rows[name] = {
            "block_configs": summarize(model.config.block_configs, library.hidden_size),
            "params": count_params(model.config),
            "kv_bytes_per_token": kv_cache_bytes_per_token(model.config, model.dtype.itemsize),
            "predicted_decode_step_ms": predicted_ms,
            **measured[name],
            "predicted_speedup": predicted_speedup,
            "measured_speedup": measured_speedup,
            "relative_error": predicted_speedup / measured_speedup - 1.0,
        }
    del models
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {
        "cost": {
            **cost_summary(costs),
            "parent_decode_step_ms": {
                "predicted": predicted_parent_ms,
                "measured_by_cost_model": costs.parent_measured.decode_ms,
            },
        },
        "models": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (checks the path)")
    parser.add_argument("--batches", type=int, nargs="+", help="batch sizes (default: 1 32 128; smoke: 1 4)")
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.7, 0.5], help="latency budget ratios")
    parser.add_argument("--out", type=Path, help="default: benchmarks/results/nas_speedup.json")
    args = parser.parse_args()
    setup = SMOKE if args.smoke else FULL
    if args.batches:
        setup = replace(setup, batches=args.batches)
    out_path = args.out or RESULTS / ("nas_speedup-smoke.json.tmp" if args.smoke else "nas_speedup.json")
    if setup.device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: run on a GPU, or pass --smoke for the CPU check")

    started = time.perf_counter()
    parent = build_parent(setup)
    library = build_library(parent.config, NASConfig(ffn_intermediate_sizes=setup.ffn_sizes))
    report = {
        **report_header("nas_speedup", setup, parent, library),
        "quality_proxy": QUALITY_PROXY,
        "budgets": args.budgets,
        "batches": {},
        "complete": False,
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    for batch in setup.batches:
        t = time.perf_counter()
        report["batches"][str(batch)] = run_batch(parent, library, setup, batch, args.budgets)
        report["wall_time_s"] = time.perf_counter() - started
        report["complete"] = batch == setup.batches[-1]
        out_path.write_text(json.dumps(report, indent=2) + "\n")  # after every batch: a crash keeps the rest
        print(f"batch {batch}: {time.perf_counter() - t:.1f} s", flush=True)
    print_table(report)
    print(f"wrote {out_path} ({report['wall_time_s']:.0f} s)")


def print_table(report: dict) -> None:
    """Per batch and model: measured tokens/s and step time, predicted step time, both speedups, relative error."""
    print(f"\n{report['device']}; torch {report['versions']['torch']}; quality proxy: parameters removed")
    print(
        f"{'batch':>5} {'model':<10} {'tok/s':>10} {'step ms':>8} {'pred ms':>8} {'measured':>9} "
        f"{'predicted':>9} {'rel err':>8}  block_configs"
    )
    errors = []
    for batch, data in report["batches"].items():
        for name, row in data["models"].items():
            print(
                f"{batch:>5} {name:<10} {row['decode_tokens_per_s']:>10.0f} {row['decode_step_ms']:>8.3f} "
                f"{row['predicted_decode_step_ms']:>8.3f} {row['measured_speedup']:>8.2f}x "
                f"{row['predicted_speedup']:>8.2f}x {100 * row['relative_error']:>+7.1f}%  {row['block_configs']}"
            )
            if name != "parent":
                errors.append(abs(row["relative_error"]))
    lowest = min(report["budgets"])
    speedups = [d["models"][f"child@{lowest}"]["measured_speedup"] for d in report["batches"].values()]
    print(
        f"{lowest}x budget: measured speedup {min(speedups):.2f}x to {max(speedups):.2f}x (goal >= 1.8x); "
        f"largest |predicted / measured - 1| over the children: {100 * max(errors):.1f}% (goal <= 15%)"
    )


if __name__ == "__main__":
    main()
