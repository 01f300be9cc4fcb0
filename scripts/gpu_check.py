"""GPU-side checks around a `nemoforge run smollm2-135m-gpu` (the device runner scripts/gpu_run.sh calls them).

    python scripts/gpu_check.py sweep  --out sweep.json                 # no weights needed
    python scripts/gpu_check.py arch   --solutions S --out arch.json     # no weights needed
    python scripts/gpu_check.py models --workdir W --out models.json    # after a run
    python scripts/gpu_check.py gsm8k  --workdir W --out gsm8k.json --gsm8k test_500.jsonl
    python scripts/gpu_check.py mlflow --workdir W --out mlflow.json    # dump the run's MLflow records

sweep: a random-init SmolLM2-135M-shaped parent (30 layers, hidden 576, FFN 1536, 9/3 heads, vocab 49152, bf16)
    on the GPU; the nas cost model (``measure_costs``) at batch 1 and 64 (P prompt + N new tokens); for each
    latency budget, the MIP child at each batch (quality proxy: parameters removed, as benchmarks/nas_speedup.py)
    and its predicted decode-step speedup at BOTH batches, so one can see whether a child searched at one batch
    also meets the claim at the other; then the measured decode speedup of those children (generate, CUDA graphs).
arch: the decode tokens/s at each --batches of a run's chosen child (--solutions, nas's solutions.json, solution 0)
    and of the parent, both random-init in that shape (bf16), measured as in models.
models: the run's parent, nas child, distill and cpt outputs (and sft/rl): decode tokens/s at batch 1 and 64
    (bf16, static KV cache + CUDA graphs, difference method t(N new) - t(2 new), models round-robin, median of
    repeats) with the speedup over the parent, and next-token top-1 accuracy / loss on the corpus held-out
    rows (retention = child top-1 / parent top-1).
gsm8k: the 500 GSM8K test problems (``--gsm8k``) for the parent and the run's final child (rl, else sft, ...):
    reasoning-on pass@1 (one sample at the eval temperature) and reasoning-off greedy, each with its 95% Wilson
    interval, and on-mode toggle compliance; eval's own ``evaluate_model``, so grading is the pipeline's.
rl: GRPO variants on the run's sft model, one after another, to calibrate rl on a warm machine: each --variant
    is space-separated recipe overrides (``rl.lr=2e-5 rl.steps=150``) over --recipe and --set; the rl stage's
    own ``run`` (same code as the pipeline, outputs under <workdir>/artifacts/sweeps/), and per variant its
    held-out figures (greedy and, with rl.heldout_samples, sampled pass@1, per reasoning mode, with intervals),
    reward/KL curves and wall time; samples are copied to <workdir>/logs/sweeps/ (logs.tgz). A variant that
    overrides ``data.*`` or ``sft.*`` (``data.arithmetic.num_steps=4``: another task) first runs the sft stage
    on the run's cpt model with those overrides, and rl starts from that.
mlflow: every run of the experiment: name, stage tag, status, start/end, wall time, metrics, tags, and the
    metric histories (compact), as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

SHORT = 2


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def decode_speed(models: dict, prompt_BT: torch.Tensor, new_tokens: int, repeats: int) -> dict[str, dict]:
    """Per model: decode tokens/s = B * (N - 2) / median[t(generate N) - t(generate 2)], round-robin."""
    from nemoforge.models.generate import generate

    diff: dict[str, list[float]] = {k: [] for k in models}
    for r in range(1 + repeats):
        for name, model in models.items():
            times = []
            for n in (new_tokens, SHORT):
                _sync()
                t = time.perf_counter()
                generate(model, prompt_BT, n)
                _sync()
                times.append(time.perf_counter() - t)
            if r:
                diff[name].append(times[0] - times[1])
    B = prompt_BT.shape[0]
    out = {}
    for name, d in diff.items():
        med = statistics.median(d)
        out[name] = {
            "tokens_per_s": B * (new_tokens - SHORT) / med,
            "step_ms": 1e3 * med / (new_tokens - SHORT),
            "spread_step_ms": [1e3 * x / (new_tokens - SHORT) for x in (min(d), max(d))],
        }
    base = out[next(iter(out))]["tokens_per_s"]
    for row in out.values():
        row["speedup"] = row["tokens_per_s"] / base
    return out


@torch.no_grad()
def heldout_top1(model, ids_NT: torch.Tensor, batch: int = 16) -> dict[str, float]:
    """Next-token top-1 accuracy and mean CE (nats) over all positions of the held-out rows (bf16)."""
    dev = next(model.parameters()).device
    correct = total = 0
    ce = 0.0
    for s in range(0, ids_NT.shape[0], batch):
        x = ids_NT[s : s + batch].to(dev)
        logits = model(x, use_cache=False).logits[:, :-1].float()
        y = x[:, 1:]
        correct += (logits.argmax(-1) == y).sum().item()
        ce += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum").item()
        total += y.numel()
    return {"top1": correct / total, "loss": ce / total, "tokens": total}


def _random_parent(device: str):
    """A random-init SmolLM2-135M-shaped all-parent DeciLM in bf16 (speed depends on shapes, not on weights)."""
    from transformers import LlamaConfig

    from nemoforge.models.convert import decilm_config_from_llama
    from nemoforge.models.hf.modeling_decilm import DeciLMForCausalLM

    cfg = decilm_config_from_llama(LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, max_position_embeddings=8192, rope_theta=100000.0, tie_word_embeddings=True))
    torch.manual_seed(0)
    with torch.device(device):
        return DeciLMForCausalLM(cfg).to(torch.bfloat16).eval()


# ------------------------------------------------------------------------------------------------- arch
def cmd_arch(args) -> dict:
    """The decode speedup, at each batch, of a run's chosen child (nas solutions.json, solution 0) over the parent."""
    from nemoforge.models.block_configs import summarize
    from nemoforge.models.convert import child_from_parent
    from nemoforge.models.hf.configuration_decilm import BlockConfig

    solution = json.loads(args.solutions.read_text())["solutions"][0]
    block_configs = [BlockConfig.from_dict(b) for b in solution["block_configs"]]
    parent = _random_parent(args.device)
    with torch.device(args.device):
        models = {"parent": parent, "child": child_from_parent(parent, block_configs)}
    report = {"solutions": str(args.solutions), "block_configs": summarize(block_configs, parent.config.hidden_size),
              "predicted_speedup_searched_batch": solution["speedup"], "prompt": args.prompt, "new": args.new}
    for b in args.batches:
        prompt = torch.randint(parent.config.vocab_size, (b, args.prompt), device=args.device)
        report[f"decode_b{b}"] = decode_speed(models, prompt, args.new, args.repeats)
        row = report[f"decode_b{b}"]["child"]
        print(f"b{b}: child x{row['speedup']:.3f} ({row['tokens_per_s']:.0f} tok/s, {report['block_configs']})", flush=True)
    return report


# ------------------------------------------------------------------------------------------------ sweep
def cmd_sweep(args) -> dict:
    from nemoforge.config import CostConfig, NASConfig
    from nemoforge.models.block_configs import summarize
    from nemoforge.models.convert import child_from_parent
    from nemoforge.stages.nas.cost import device_name, measure_costs
    from nemoforge.stages.nas.library import build_library
    from nemoforge.stages.nas.mip import Option, search

    parent = _random_parent(args.device)
    cfg = parent.config
    library = build_library(parent.config, NASConfig(ffn_intermediate_sizes=args.ffn))
    costs = {}
    for b in args.batches:
        t = time.perf_counter()
        costs[b] = measure_costs(parent, library, CostConfig(batch_size=b, prefill_tokens=args.prompt,
                                                             decode_tokens=args.new, repeats=5))
        print(f"cost b{b}: {time.perf_counter() - t:.1f} s; attention {costs[b].attention.decode_ms:.4f} ms/layer, "
              f"ffn {({w: round(l.decode_ms, 4) for w, l in costs[b].ffn.items()})}, fixed {costs[b].fixed.decode_ms:.4f}, "
              f"parent measured {costs[b].parent_measured.decode_ms:.4f} ms/step", flush=True)
    parent_bytes = costs[args.batches[0]].param_bytes(library.parent)
    parent_choice = [row.index(library.parent) for row in library.variants]
    report = {"device": device_name(torch.device(args.device)), "prompt": args.prompt, "new": args.new,
              "cost": {b: c.to_json() for b, c in costs.items()}, "children": []}
    models = {"parent": parent}
    for b in args.batches:
        c = costs[b]
        options = [[Option(kl_div=1.0 - c.param_bytes(v) / parent_bytes, latency_ms=c.latency(v).request_ms(args.new),
                           memory_bytes=c.param_bytes(v)) for v in row] for row in library.variants]
        for ratio in args.budgets:
            (sol,) = search(options, parent_choice=parent_choice, fixed_latency_ms=c.fixed.request_ms(args.new),
                            fixed_memory_bytes=c.fixed_param_bytes, latency_budget_ratio=ratio, memory_budget_gib=None,
                            num_solutions=1, min_diversity_layers=1, time_limit_s=20.0)
            chosen = [library.variants[i][j] for i, j in enumerate(sol.choice)]
            pred = {}
            for b2, c2 in costs.items():
                par = c2.predicted([library.parent] * library.num_layers)
                ch = c2.predicted(chosen)
                pred[f"b{b2}"] = {"decode": par.decode_ms / ch.decode_ms, "request": par.request_ms(args.new) / ch.request_ms(args.new)}
            name = f"child_b{b}_r{ratio}"
            bc = [library.block_config(v) for v in chosen]
            report["children"].append({"name": name, "searched_at_batch": b, "budget": ratio,
                                       "block_configs": summarize(bc, library.hidden_size), "predicted_speedup": pred})
            print(name, summarize(bc, library.hidden_size), json.dumps(pred), flush=True)
            with torch.device(args.device):
                models[name] = child_from_parent(parent, bc)
    measured = {}
    for b in args.batches:
        prompt = torch.randint(cfg.vocab_size, (b, args.prompt), device=args.device)
        measured[f"b{b}"] = decode_speed(models, prompt, args.new, args.repeats)
        for name, row in measured[f"b{b}"].items():
            print(f"measured b{b} {name}: {row['tokens_per_s']:.0f} tok/s, {row['step_ms']:.3f} ms/step, x{row['speedup']:.2f}", flush=True)
    report["measured"] = measured
    return report


# ----------------------------------------------------------------------------------------------- models
def cmd_models(args) -> dict:
    from nemoforge.data.corpus import load_corpus
    from nemoforge.models.block_configs import count_params, summarize
    from nemoforge.models.convert import load_causal_lm

    workdir = args.workdir.resolve()
    corpora = sorted((workdir / "artifacts" / "corpus").iterdir(), key=lambda p: p.stat().st_mtime)
    paths = _stage_models(workdir)
    corpus = load_corpus(corpora[-1])
    heldout = corpus.heldout_ids_NT
    models = {k: load_causal_lm(p, dtype=torch.bfloat16).to(args.device).eval() for k, p in paths.items()}
    report = {"heldout_rows": int(heldout.shape[0]), "seq_len": int(heldout.shape[1]), "models": {}}
    for k, m in models.items():
        report["models"][k] = {"path": str(paths[k]), "params": count_params(m.config),
                               "block_configs": summarize(m.config.block_configs, m.config.hidden_size),
                               **heldout_top1(m, heldout)}
    ptop = report["models"]["parent"]["top1"]
    for row in report["models"].values():
        row["retention_top1"] = row["top1"] / ptop
    speed_models = {k: models[k] for k in ("parent", "nas", "cpt") if k in models}
    for b in args.batches:
        reps = (heldout.shape[0] + b - 1) // b
        prompt = heldout.repeat(reps, 1)[:b, : args.prompt].contiguous().to(args.device)
        report[f"decode_b{b}"] = decode_speed(speed_models, prompt, args.new, args.repeats)
    report["prompt"], report["new"] = args.prompt, args.new
    for k, row in report["models"].items():
        sp = " ".join(f"b{b} x{report[f'decode_b{b}'][k]['speedup']:.2f} ({report[f'decode_b{b}'][k]['tokens_per_s']:.0f} tok/s)"
                      for b in args.batches if k in report[f"decode_b{b}"])
        print(f"{k:8} top1 {row['top1']:.4f} (ret {row['retention_top1']:.3f}) loss {row['loss']:.3f} {sp} {row['block_configs']}")
    return report


# ------------------------------------------------------------------------------------------------ gsm8k
def _stage_models(workdir: Path) -> dict[str, Path]:
    """The run's parent and each finished stage's exported model, by stage name."""
    from nemoforge import lineage

    runs = lineage.Lineage(f"sqlite:///{workdir / 'mlflow.db'}", "nemoforge", str(workdir / "artifacts"))
    stages = {s["stage"]: s for s in lineage.pipeline_status(runs)}
    paths = {"parent": sorted((workdir / "artifacts" / "models").glob("parent-*"))[-1]}
    for st in ("nas", "distill", "cpt", "sft", "rl"):
        if st in stages and "model" in stages[st].get("outputs", {}):
            p = Path(stages[st]["outputs"]["model"])
            if (p / "config.json").is_file():
                paths[st] = p
    if len(paths) == 1:
        raise SystemExit(f"no stage model found under {workdir / 'artifacts'}: the run's stage outputs do not resolve there")
    return paths


def cmd_gsm8k(args) -> dict:
    from transformers import AutoTokenizer

    from nemoforge.config import EvalConfig
    from nemoforge.data.reasoning import math_problems, read_chat_samples
    from nemoforge.models.convert import load_causal_lm
    from nemoforge.stages.eval.stage import evaluate_model
    from nemoforge.stats import clustered_wilson_interval

    paths = _stage_models(args.workdir.resolve())
    final = next(st for st in ("rl", "sft", "cpt", "distill", "nas", "parent") if st in paths)
    problem_set = math_problems(read_chat_samples(args.gsm8k))
    cfg = EvalConfig(num_problems=len(problem_set.problems), num_samples=1, max_new_tokens=args.gsm8k_tokens,
                     batch_size=args.gsm8k_batch)
    report = {"file": str(args.gsm8k), "problems": len(problem_set.problems),
              "unparseable": problem_set.num_unparseable, "max_new_tokens": cfg.max_new_tokens,
              "temperature_on": cfg.temperature, "top_p_on": cfg.top_p, "final_stage": final, "models": {}}
    for name in ("parent", final):
        model = load_causal_lm(paths[name], dtype=torch.bfloat16).to(args.device).eval()
        tokenizer = AutoTokenizer.from_pretrained(paths[name], config=model.config)
        t = time.perf_counter()
        rates, _ = evaluate_model(model, tokenizer, problem_set.problems, cfg, seed=0)  # no recipe here: a fixed seed
        row = {"path": str(paths[name]), "wall_s": time.perf_counter() - t}
        for metric, tally in rates.items():
            low, high = clustered_wilson_interval(tally.successes_C, tally.trials_C)
            row |= {metric: tally.rate, f"{metric}_ci_low": low, f"{metric}_ci_high": high}
        report["models"]["child" if name == final else "parent"] = row
        print(f"gsm8k {name:7} on {row['math_pass1_on']:.3f} [{row['math_pass1_on_ci_low']:.3f}, "
              f"{row['math_pass1_on_ci_high']:.3f}]  off {row['math_pass1_off']:.3f} [{row['math_pass1_off_ci_low']:.3f}, "
              f"{row['math_pass1_off_ci_high']:.3f}]  ({row['wall_s']:.0f} s)")
        del model
        torch.cuda.empty_cache()
    return report


# ----------------------------------------------------------------------------------------------- rl
def _exported_greedy(recipe, store, model_uri: str, data_uri: str) -> dict[str, float]:
    """Greedy held-out accuracy per reasoning mode of rl's export reloaded as eval loads it (``recipe.dtype``),
    beside rl's own figure on its in-memory float32 policy: updates below the export dtype's resolution vanish."""
    from transformers import AutoTokenizer

    from nemoforge.data.sft_split import read_sft_split
    from nemoforge.models.convert import load_causal_lm
    from nemoforge.runtime import compute_device, recipe_dtype
    from nemoforge.stages.rl.stage import heldout_reward, rl_problems

    path = store.fetch(model_uri)
    model = load_causal_lm(path, dtype=recipe_dtype(recipe)).to(compute_device()).eval()
    tokenizer = AutoTokenizer.from_pretrained(path, config=model.config)
    _, heldout, _ = rl_problems(recipe, read_sft_split(store, data_uri), store)
    _, samples = heldout_reward(model, tokenizer, heldout, recipe.rl)
    del model
    torch.cuda.empty_cache()
    scored = [s for s in samples if s["rewards"]["accuracy"] is not None]
    return {mode: statistics.fmean(s["rewards"]["accuracy"] for s in scored if s["reasoning"] == mode)
            for mode in ("on", "off")}


def cmd_rl(args) -> dict:
    import shutil

    from nemoforge.artifacts import store_for
    from nemoforge.config import load_recipe
    from nemoforge.preflight import resolve_recipe
    from nemoforge.stages import rl, sft

    workdir = args.workdir.resolve()
    models = _stage_models(workdir)
    report: dict = {"sft_model": str(models["sft"]), "recipe": args.recipe, "sets": args.set, "variants": []}
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for i, variant in enumerate(args.variant):
        sets = [*args.set, *variant.split()]
        recipe = resolve_recipe(load_recipe(args.recipe, sets), workdir)
        store = store_for(recipe)
        name = f"rl-{stamp}-{i}"
        t = time.perf_counter()
        row: dict = {"variant": variant}
        start, data_uri = str(models["sft"]), str(models["sft"].parent / "data")  # sft's model/ and data/
        if any(kv.startswith(("data.", "sft.")) for kv in variant.split()):
            tuned = sft.run(recipe, model_uri=str(models["cpt"]), output_uri=store.join("sweeps", name, "sft"), store=store)
            start, data_uri = tuned.outputs["model"], tuned.outputs["data"]
            row["sft"] = {k: v for k, v in tuned.metrics.items() if k.startswith(("toggle", "loss_heldout"))}
            row["sft_wall_s"] = time.perf_counter() - t
        result = rl.run(recipe, model_uri=start, data_uri=data_uri, output_uri=store.join("sweeps", name, "rl"),
                        store=store)
        m = result.metrics
        row["exported_greedy"] = _exported_greedy(recipe, store, result.outputs["model"], data_uri)
        row |= {
            "wall_s": time.perf_counter() - t,
            "metrics": {k: v for k, v in m.items() if k.startswith(("accuracy_heldout", "reward_accuracy_heldout"))},
            "history": {k: [v for _, v in result.history[k]] for k in ("reward_accuracy", "kl", "completion_tokens")
                        if k in result.history},
        }
        report["variants"].append(row)
        shutil.copytree(Path(result.outputs["samples"]), workdir / "logs" / "sweeps" / name, dirs_exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1, default=str) + "\n")
        sampled = m.get("accuracy_heldout_sampled_on_gain")
        print(f"rl {variant:40} greedy on {m.get('accuracy_heldout_on_gain', float('nan')):+.3f} "
              f"[{m.get('accuracy_heldout_on_gain_ci_low', float('nan')):+.3f}, "
              f"{m.get('accuracy_heldout_on_gain_ci_high', float('nan')):+.3f}]  all {m['accuracy_heldout_gain']:+.3f}"
              + (f"  sampled on {sampled:+.3f} ({m['accuracy_heldout_sampled_on_before']:.3f} -> "
                 f"{m['accuracy_heldout_sampled_on_after']:.3f})" if sampled is not None else "")
              + f"  exported greedy on {row['exported_greedy']['on']:.3f}  ({row['wall_s']:.0f} s)", flush=True)
    return report


# ----------------------------------------------------------------------------------------------- mlflow
def cmd_mlflow(args) -> dict:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{args.workdir.resolve() / 'mlflow.db'}")
    out = []
    for exp in client.search_experiments():
        for run in client.search_runs([exp.experiment_id], max_results=1000):
            info = run.info
            hist = {}
            for key in run.data.metrics:
                h = client.get_metric_history(info.run_id, key)
                if len(h) > 1:
                    hist[key] = [(m.step, round(m.value, 6)) for m in h]
            out.append({
                "experiment": exp.name, "run_id": info.run_id, "run_name": info.run_name, "status": info.status,
                "start": info.start_time, "end": info.end_time,
                "wall_s": (info.end_time - info.start_time) / 1e3 if info.end_time else None,
                "metrics": run.data.metrics, "tags": {k: v for k, v in run.data.tags.items() if len(v) < 2000},
                "history": hist,
            })
    return {"runs": out}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["sweep", "arch", "models", "gsm8k", "rl", "mlflow"])
    p.add_argument("--workdir", type=Path, default=Path("nemoforge-work/gpu"))
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    p.add_argument("--budgets", type=float, nargs="+", default=[0.7, 0.6, 0.5])
    p.add_argument("--ffn", type=int, nargs="+", default=[1024, 768, 512])
    p.add_argument("--prompt", type=int, default=256)
    p.add_argument("--new", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda")
    p.add_argument("--solutions", type=Path, help="arch: a nas run's solutions.json")
    p.add_argument("--gsm8k", type=Path, help="GSM8K test JSONL (question, answer ending in '#### N')")
    p.add_argument("--gsm8k-tokens", type=int, default=384, help="max new tokens per GSM8K reply")
    p.add_argument("--gsm8k-batch", type=int, default=128)
    p.add_argument("--recipe", default="smollm2-135m-gpu", help="rl: the recipe the variants override")
    p.add_argument("--set", action="append", default=[], help="rl: KEY=VALUE override for every variant")
    p.add_argument("--variant", action="append", default=[], help="rl: space-separated KEY=VALUE overrides")
    args = p.parse_args()
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    t = time.perf_counter()
    modes = {"sweep": cmd_sweep, "arch": cmd_arch, "models": cmd_models, "gsm8k": cmd_gsm8k, "rl": cmd_rl, "mlflow": cmd_mlflow}
    report = modes[args.mode](args)
    report["wall_s"] = time.perf_counter() - t
    report["torch"] = torch.__version__
    args.out.write_text(json.dumps(report, indent=1, default=str) + "\n")
    print(f"wrote {args.out} ({report['wall_s']:.0f} s)", file=sys.stderr)


if __name__ == "__main__":
    main()
