"""Child vs parent, side by side in one run: decode tokens/s, parameters, KV-cache bytes/token, KL to the parent.

    python benchmarks/child_vs_parent.py [--workdir nemoforge-work] [--run RUN_NAME]

Reads the models of one `nemoforge run` (default: the latest in --workdir): the parent, the nas child
(before distill), the distill output and the cpt output, and the run's held-out corpus. Measures, on
this machine, greedy decode throughput with nemoforge's KV-cached decoder at batch 1 and batch 8
(the same engine for every model, so the ratio is the architecture's), and KL(parent || model) per
token on the held-out sequences. Writes benchmarks/results/child_vs_parent.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from nemoforge import lineage
from nemoforge.data.corpus import load_corpus
from nemoforge.models.block_configs import count_params, kv_cache_bytes_per_token, summarize
from nemoforge.models.convert import load_causal_lm
from nemoforge.models.generate import generate
from nemoforge.training.evaluate import evaluate_heldout

RESULTS = Path(__file__).parent / "results"


def decode_tokens_per_s(models: dict, prompt_BT: torch.Tensor, new_tokens: int, repeats: int) -> dict[str, float]:
    """Median tokens/s (batch × new tokens / wall time) of greedy decoding after the prompt, per model.

    The models are timed round-robin (parent, child, parent, child, ...) so that load changes on a shared
    machine hit every model alike and the ratios stay meaningful.
    """
    times: dict[str, list[float]] = {label: [] for label in models}
    for model in models.values():
        generate(model, prompt_BT, 4)  # warm-up
    for _ in range(repeats):
        for label, model in models.items():
            start = time.perf_counter()
            out = generate(model, prompt_BT, new_tokens)
            times[label].append(time.perf_counter() - start)
            assert out.shape[1] == prompt_BT.shape[1] + new_tokens
    return {label: prompt_BT.shape[0] * new_tokens / statistics.median(t) for label, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("nemoforge-work"))
    parser.add_argument("--run", help="pipeline run name (default: latest)")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--kl-sequences", type=int, default=16)
    args = parser.parse_args()
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    torch.manual_seed(0)

    workdir = args.workdir.resolve()
    stages = {s["stage"]: s for s in lineage.pipeline_status(lineage.Lineage(f"sqlite:///{workdir / 'mlflow.db'}", "nemoforge"), args.run)}
    parents = sorted((workdir / "artifacts" / "models").glob("parent-*"))
    corpora = sorted((workdir / "artifacts" / "corpus").iterdir(), key=lambda p: p.stat().st_mtime)
    models = {"parent": parents[-1]}
    for stage, label in (("nas", "child (nas)"), ("distill", "child (distill)"), ("cpt", "child (cpt)")):
        if stage in stages and "model" in stages[stage]["outputs"]:
            models[label] = Path(stages[stage]["outputs"]["model"])
    corpus = load_corpus(corpora[-1])
    heldout_NT = corpus.heldout_ids_NT[: args.kl_sequences]
    prompt_T = corpus.heldout_ids_NT[0, : args.prompt_tokens]

    parent = load_causal_lm(models["parent"]).eval()
    loaded = {label: parent if label == "parent" else load_causal_lm(path).eval() for label, path in models.items()}
    rows = {}
    for label, model in loaded.items():
        rows[label] = {
            "uri": str(models[label]),
            "params": count_params(model.config),
            "kv_cache_bytes_per_token_bf16": kv_cache_bytes_per_token(model.config, kv_bytes=2),
            "block_configs": summarize(model.config.block_configs, model.config.hidden_size),
        }
    with torch.inference_mode():
        for b in args.batch_sizes:
            prompt_BT = prompt_T.expand(b, -1).contiguous()
            for label, tps in decode_tokens_per_s(loaded, prompt_BT, args.new_tokens, args.repeats).items():
                rows[label][f"decode_tokens_per_s_batch{b}"] = round(tps, 2)
        for label, model in loaded.items():
            if label != "parent":
                rows[label]["kl_div_heldout"] = evaluate_heldout(model, heldout_NT, batch_size=4, teacher=parent)["kl_div_heldout"]
    for label, row in rows.items():
        print(label, json.dumps(row))

    base = rows["parent"]
    for row in rows.values():
        for b in args.batch_sizes:
            row[f"speedup_batch{b}"] = round(row[f"decode_tokens_per_s_batch{b}"] / base[f"decode_tokens_per_s_batch{b}"], 3)
    result = {
        "benchmark": "child_vs_parent",
        "command": "python benchmarks/child_vs_parent.py --workdir " + str(args.workdir),
        "device": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, fp32",
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "kl_sequences": int(heldout_NT.shape[0]),
        "models": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "child_vs_parent.json").write_text(json.dumps(result, indent=2) + "\n")

    print(f"\n{'model':18} {'params':>12} {'KV B/tok':>9} " + " ".join(f"{'tok/s b' + str(b):>11} {'x':>5}" for b in args.batch_sizes) + f" {'KL':>8}")
    for label, row in rows.items():
        cols = " ".join(f"{row[f'decode_tokens_per_s_batch{b}']:>11.1f} {row[f'speedup_batch{b}']:>5.2f}" for b in args.batch_sizes)
        kl = row.get("kl_div_heldout")
        print(f"{label:18} {row['params']:>12,} {row['kv_cache_bytes_per_token_bf16']:>9,} {cols} {kl if kl is None else round(kl, 4)!s:>8}")


if __name__ == "__main__":
    main()
