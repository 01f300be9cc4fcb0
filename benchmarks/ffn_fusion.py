"""FFN Fusion on a real nas child, fused vs unfused: decode tokens/s at batch 1 and 8, KL to the parent, and KL
after a short distill of each.

    python benchmarks/ffn_fusion.py [--workdir nemoforge-work] [--kl-budgets 0.1 1e9] [--distill-steps N]

Reads one `nemoforge run` of the demo recipe (the newest under --workdir): the parent (``artifacts/models/parent-*``),
the nas child (``<run>/nas/model``) and the corpus. Fuses the child's attention-free runs with
``nemoforge.stages.nas.fusion.ffn_fusion`` (replace-and-score KL on --score-sequences held-out rows; the runs that
fit each of --kl-budgets; 1e9 fuses all), then measures on this machine, for parent, unfused and fused children:
greedy decode tokens/s with nemoforge's KV-cached decoder (round-robin, median of --repeats; the same engine for
every model, so the ratios are the architecture's) and KL(parent || model) per token on --kl-sequences held-out
rows (rows after the scoring rows: fusion never saw them).

Then each child, unfused and fused, goes through the distill stage itself (``nemoforge.stages.distill.run``: GKD from
the parent on the corpus's training rows, --recipe's ``distill`` section, --distill-steps steps, in a temporary
store) and its KL to the parent is measured again on the same unseen rows: "fused, then distilled" beside "unfused,
then distilled" with the same steps says whether distillation recovers what fusion cost. Prints tables and writes
benchmarks/results/ffn_fusion_cpu.json.

Sources: FFN Fusion (arXiv 2503.18908); Llama-Nemotron Ultra (arXiv 2505.00949 §2).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
from child_vs_parent import decode_tokens_per_s  # benchmarks/ is sys.path[0] when run as a script
from transformers import AutoTokenizer

from nemoforge.artifacts import open_store
from nemoforge.config import load_recipe
from nemoforge.data.corpus import load_corpus
from nemoforge.models.block_configs import count_params, summarize
from nemoforge.models.convert import load_causal_lm
from nemoforge.models.export import export_checkpoint
from nemoforge.stages import distill
from nemoforge.stages.nas.fusion import ffn_fusion
from nemoforge.stages.nas.scoring import parent_pass

RESULTS = Path(__file__).parent / "results"


@torch.no_grad()
def kl_to_parent(parent, models: dict, ids_NT: torch.Tensor, batch: int = 4) -> dict[str, float]:
    """KL(parent || model) in nats per token, averaged over ``ids_NT`` (scored ``batch`` rows at a time)."""
    sums = dict.fromkeys(models, 0.0)
    for start in range(0, len(ids_NT), batch):
        rows = ids_NT[start : start + batch]
        reference = parent_pass(parent, rows)
        for label, model in models.items():
            sums[label] += reference.score(model(rows).logits)[0] * len(rows)
    return {label: total / len(ids_NT) for label, total in sums.items()}


def distilled(
    models: dict, tokenizer, recipe, *, parent_dir: Path, corpus_dir: Path, root: Path
) -> tuple[dict, dict]:
    """Each model through the distill stage (``nemoforge.stages.distill.run`` with ``recipe``) in a store under
    ``root``: ``({label: distilled model}, {label: {the stage's metrics, wall time}})``."""
    store = open_store(str(root))
    out_models, reports = {}, {}
    for i, (label, model) in enumerate(models.items()):
        model_dir = export_checkpoint(model, tokenizer, root / f"in-{i}")
        started = time.perf_counter()
        result = distill.run(
            recipe,
            parent_uri=str(parent_dir),
            model_uri=str(model_dir),
            corpus_uri=str(corpus_dir),
            output_uri=store.join(f"out-{i}"),
            store=store,
        )
        out_models[f"{label}, distilled"] = load_causal_lm(result.outputs["model"])
        keep = ("kl_div_heldout_before", "kl_div_heldout_after", "train_steps", "tokens_per_s", "loss_final")
        reports[f"{label}, distilled"] = {
            **{k: result.metrics[k] for k in keep},
            "time_s": time.perf_counter() - started,
        }
    return out_models, reports


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", type=Path, default=Path("nemoforge-work"))
    parser.add_argument(
        "--kl-budgets",
        type=float,
        nargs="+",
        default=[0.1, 1e9],
        help="nas.ffn_fusion.kl_budget values (1e9: all)",
    )
    parser.add_argument("--score-sequences", type=int, default=2)
    parser.add_argument("--kl-sequences", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--recipe", default="smollm2-135m-demo", help="whose distill section distills")
    parser.add_argument("--distill-steps", type=int, help="distill.steps (default: the recipe's)")
    parser.add_argument(
        "--distill-heldout-sequences",
        type=int,
        default=4,
        help="distill.heldout_sequences: rows the stage itself scores before and after",
    )
    parser.add_argument("--no-distill", action="store_true", help="skip the distill of each child")
    parser.add_argument(
        "--note", default="", help="a remark stored in the JSON (e.g. that the machine was shared)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "ffn_fusion_cpu.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    steps = args.distill_steps or load_recipe(args.recipe).distill.steps
    recipe = load_recipe(  # before any compute: a bad override fails at once
        args.recipe,
        [
            f"distill.steps={steps}",
            f"distill.checkpoint_every_steps={steps}",  # one checkpoint (the last step's), ~1 GB here
            f"distill.heldout_sequences={args.distill_heldout_sequences}",
        ],
    )

    artifacts = args.workdir.resolve() / "artifacts"
    parents = sorted((artifacts / "models").glob("parent-*"))
    if not parents:
        sys.exit(f"no demo run under {args.workdir}: run `nemoforge run smollm2-135m-demo --workdir {args.workdir}` first")
    parent_dir = parents[-1]
    child_dir = sorted(artifacts.glob("*/nas/model"), key=lambda p: p.stat().st_mtime)[-1]
    corpus_dir = sorted((artifacts / "corpus").iterdir(), key=lambda p: p.stat().st_mtime)[-1]
    heldout_NT = load_corpus(corpus_dir).heldout_ids_NT[:, : args.seq_len]
    score_NT = heldout_NT[: args.score_sequences]
    kl_NT = heldout_NT[args.score_sequences : args.score_sequences + args.kl_sequences]
    if len(kl_NT) < 1:
        parser.error(f"the corpus has {len(heldout_NT)} held-out rows: none left after --score-sequences")

    parent = load_causal_lm(parent_dir)
    child = load_causal_lm(child_dir)
    models = {"parent": parent, "child (unfused)": child}
    fusions = {}
    for budget in args.kl_budgets:
        started = time.perf_counter()
        fused, report = ffn_fusion(child, score_NT, budget)
        label = f"fused, budget {budget:g}"
        models[label], fusions[label] = fused, {**report, "time_s": time.perf_counter() - started}
    kl = kl_to_parent(parent, models, kl_NT)
    children = {label: m for label, m in models.items() if label != "parent"}
    distill_reports = {}
    if not args.no_distill:
        with tempfile.TemporaryDirectory() as tmp:
            after, distill_reports = distilled(
                children,
                AutoTokenizer.from_pretrained(parent_dir),  # the child keeps the parent's tokenizer
                recipe,
                parent_dir=parent_dir,
                corpus_dir=corpus_dir,
                root=Path(tmp),
            )
            kl.update(kl_to_parent(parent, after, kl_NT))
            del after
    prompt_T = heldout_NT[-1, : args.prompt_tokens]
    speed = {
        b: decode_tokens_per_s(models, prompt_T.expand(b, -1).contiguous(), args.new_tokens, args.repeats)
        for b in args.batch_sizes
    }
    rows = {
        label: {
            "num_layers": model.config.num_hidden_layers,
            "block_configs": summarize(model.config.block_configs, model.config.hidden_size),
            "params": count_params(model.config),
            "kl_to_parent": kl[label],
            **{f"decode_tokens_per_s_batch{b}": speed[b][label] for b in args.batch_sizes},
        }
        for label, model in models.items()
    }

    print(
        f"FFN Fusion on {child_dir} ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    )
    for run in report["runs"]:  # the scores are the same under every budget
        print(
            f"  run layers {run['start']}-{run['stop'] - 1}: widths {run['widths']} -> {run['fused_width']}, "
            f"replace-and-score KL {run['kl_div']:.4f}"
        )
    header = f"{'model':22s} {'layers':>6s} {'KL(parent||.)':>14s}" + "".join(
        f" {'tok/s b' + str(b):>11s}" for b in args.batch_sizes
    )
    print(header)
    base = rows["child (unfused)"]
    for label, row in rows.items():
        line = f"{label:22s} {row['num_layers']:6d} {row['kl_to_parent']:14.4f}"
        for b in args.batch_sizes:
            value = row[f"decode_tokens_per_s_batch{b}"]
            line += f" {value:7.1f} x{value / base[f'decode_tokens_per_s_batch{b}']:.2f}"
        print(line)
    print("(x: ratio to the unfused child)")
    if distill_reports:
        print(
            f"distill stage, {recipe.distill.steps} steps x {recipe.distill.batch_size} rows "
            f"(KL(parent||.) on the --kl-sequences rows; the stage's own before/after on its "
            f"{args.distill_heldout_sequences} held-out rows)"
        )
        for label, report in distill_reports.items():
            print(
                f"{label:34s} KL {kl[label]:.4f} (stage: {report['kl_div_heldout_before']:.4f} -> "
                f"{report['kl_div_heldout_after']:.4f}, {report['time_s']:.0f} s)"
            )

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "machine": {
                    "processor": platform.processor() or platform.machine(),
                    "torch": torch.__version__,
                    "threads": torch.get_num_threads(),
                    "niceness": os.nice(0),
                    "load_average_at_end": os.getloadavg(),
                    "note": args.note,
                },
                "setup": {
                    "parent": parent_dir.name,
                    "child": str(child_dir.relative_to(artifacts)),
                    "dtype": "float32",
                    "kl_budgets": args.kl_budgets,
                    "score_sequences": args.score_sequences,
                    "kl_sequences": args.kl_sequences,
                    "seq_len_tokens": args.seq_len,
                    "prompt_tokens": args.prompt_tokens,
                    "new_tokens": args.new_tokens,
                    "repeats": args.repeats,
                    "decoder": "nemoforge.models.generate (KV-cached, greedy)",
                    "distill": None
                    if args.no_distill
                    else {
                        "recipe": args.recipe,
                        **recipe.distill.model_dump(
                            include={"steps", "batch_size", "lr", "warmup_steps", "cosine_weight", "kl_weight"}
                        ),
                        "heldout_sequences": args.distill_heldout_sequences,
                        "train_rows": "the corpus's training split (the KL rows are held out)",
                    },
                },
                "fusion": fusions,
                "models": rows,
                "distilled": {
                    label: {"kl_to_parent": kl[label], **report} for label, report in distill_reports.items()
                },
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
