"""sft on nemoforge's training loop vs TRL's ``SFTTrainer``: same model, rows, order, optimizer; speed, memory, loss.

    python benchmarks/sft_engine_compare.py            # CPU: SmolLM2-135M shape, 2 rows x 100 tokens, 6 updates (~3.5 min, 2 busy cores)
    python benchmarks/sft_engine_compare.py --smoke    # CPU: tiny shapes, seconds: checks the mechanics

The measurement behind "one training engine" in docs/internals.md (issue 13 §2). Skips (exit 0, one line) when
``trl`` is not importable: CI does not install TRL, and nothing in ``tests/`` needs it.

Each engine runs in its own subprocess (so each has its own peak RSS) on the same inputs:

* model: a random-init (seed 0) all-parent ``DeciLMForCausalLM`` of the SmolLM2-135M shape (hidden 576, 30
  layers, FFN 1536, 9 heads, 3 KV heads, vocab 49152, tied embeddings; ``--smoke``: tiny), float32: what the sft
  stage's ``load_causal_lm`` gives, and the CPU numerics of the stage (``mixed_precision`` auto: no autocast on
  CPU), with no activation checkpointing and no compile on either side.
* rows: generated arithmetic chats (:func:`~nemoforge.data.reasoning.arithmetic_samples`), encoded with their
  assistant mask (:func:`~nemoforge.data.reasoning.encode_chat`) and packed one chat per row as the stage packs
  them (:func:`~nemoforge.data.reasoning.pack_chats`), by the byte-level BPE of benchmarks/post_training_throughput.py
  (trained here on the chats: no download). The global batches are the stage's
  (:func:`~nemoforge.training.loop.epoch_batches`, seed 0); TRL gets them as a pre-tokenized dataset in the same
  order (``input_ids`` + ``assistant_masks``, ``train_sampling_strategy="sequential"``).
* loss: CE per assistant token of the batch on both sides: :class:`~nemoforge.stages.sft.stage.GlobalTokenMean`
  in ours; in TRL, the ``labels`` it builds from ``assistant_masks`` (-100 elsewhere) and the Trainer's
  ``num_items_in_batch`` normalization (its assistant-only loss on pre-tokenized rows).
* optimizer: nemoforge's :func:`~nemoforge.training.optim.build_optimizer` (AdamW, decay on matrices only,
  linear warmup + cosine to ``min_lr_ratio``) on both sides (TRL through ``SFTTrainer(optimizers=...)``, since the
  Trainer's own warmup starts at LR 0 and would shift the curve by one update); gradient clip 1.0 on both.

Per engine: the loss of every update (as computed in the step, unrounded), the median step seconds over the
updates after ``--warmup`` (forward, backward, clip, AdamW; ours from the loop's per-step ``tokens_per_s``, TRL's
between its ``on_step_begin`` and ``on_step_end`` callbacks), tokens/s = padded row tokens of a batch / that
median, the whole ``train()`` wall time (TRL's includes its dataset preparation), RSS before training and the
process's peak RSS. The report holds the step-0 loss difference (same weights, same batch: the loss definitions
must agree) and the max abs difference of the two loss curves. Writes ``benchmarks/results/sft_engine_compare.json``
(``...-smoke.json`` with ``--smoke``) with device, versions and command.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
ENGINES = ("nemoforge", "trl")


def rss_mib() -> float:
    """This process's resident set now (MiB), from ``/proc/self/status``."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mib() -> float:
    """This process's peak resident set so far (MiB; ``ru_maxrss`` is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def inputs(args: argparse.Namespace):
    """The tokenizer, the packed rows ``(ids_NT, mask_NT)`` and the global batch of every update (signed ids)."""
    from post_training_throughput import chat_tokenizer  # benchmarks/ is sys.path[0]

    from nemoforge.data.reasoning import arithmetic_samples, encode_chat, pack_chats, to_signed_ids
    from nemoforge.training.loop import epoch_batches

    samples = arithmetic_samples(args.samples, seed=0, num_steps=args.operations, max_operand=999)
    tokenizer = chat_tokenizer([f"{s.prompt}\n{s.response}" for s in samples])
    ids_NT, mask_NT = pack_chats(
        [encode_chat(tokenizer, s, args.seq) for s in samples], seq_len_tokens=args.seq,
        pad_token_id=tokenizer.pad_token_id, seed=0,
    )  # fmt: skip
    batches = epoch_batches(to_signed_ids(ids_NT, mask_NT), args.rows, seed=0)
    return tokenizer, ids_NT, mask_NT, [batches(i) for i in range(args.steps)]


def train_config(args: argparse.Namespace):
    from nemoforge.config import SFTConfig

    return SFTConfig(
        steps=args.steps, batch_size=args.rows, lr=args.lr, warmup_steps=args.warmup_lr_steps, grad_clip_norm=1.0,
        checkpoint_every_steps=10**9, log_every_steps=1, seq_len_tokens=args.seq,
    )  # fmt: skip


def build_model(args: argparse.Namespace, width: int) -> torch.nn.Module:
    from post_training_throughput import FULL, SMOKE, build_model

    return build_model(SMOKE if args.smoke else FULL, width, torch.device("cpu"))


def run_nemoforge(args: argparse.Namespace) -> dict:
    """The sft stage's objective on :func:`nemoforge.training.loop.train` (single-process engine)."""
    from nemoforge.stages.sft.stage import GlobalTokenMean
    from nemoforge.training.loop import train

    _, ids_NT, _, global_batches = inputs(args)
    model = build_model(args, ids_NT.shape[1])
    objective = GlobalTokenMean(global_batches.__getitem__)
    rss_before = rss_mib()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="nemoforge-sft-compare-") as tmp:
        state = train(
            model,
            objective.loss,
            objective.batches,
            train_config(args),
            seed=0,
            checkpoint_dir=Path(tmp),
            desc="sft",
        )
    train_s = time.perf_counter() - started
    row_tokens = args.rows * ids_NT.shape[1]
    return {
        "losses": [v for _, v in state.history["loss"]],
        "step_s": [row_tokens / v for _, v in state.history["tokens_per_s"]],
        "train_s": train_s,
        "rss_before_train_mib": rss_before,
    }


def run_trl(args: argparse.Namespace) -> dict:
    """``trl.SFTTrainer`` on the same rows in the same order, assistant-token loss, nemoforge's AdamW and schedule."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from nemoforge.data.reasoning import from_signed_ids
    from nemoforge.training.optim import build_optimizer

    tokenizer, ids_NT, _, global_batches = inputs(args)
    ordered_ids_NT, ordered_mask_NT = from_signed_ids(torch.cat(global_batches))
    dataset = Dataset.from_dict({
        "input_ids": ordered_ids_NT.tolist(), "assistant_masks": ordered_mask_NT.int().tolist(),
    })  # fmt: skip
    model = build_model(args, ids_NT.shape[1])
    optimizer, scheduler = build_optimizer(list(model.parameters()), train_config(args), torch.device("cpu"))
    losses: list[float] = []
    step_s: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *_, **__):
            self.started = time.perf_counter()

        def on_step_end(self, *_, **__):
            step_s.append(time.perf_counter() - self.started)

    class RecordingSFTTrainer(SFTTrainer):
        def training_step(self, *a, **kw):  # the step's loss before the Trainer's logging rounds it
            loss = super().training_step(*a, **kw)
            losses.append(loss.item())
            return loss

    with tempfile.TemporaryDirectory(prefix="nemoforge-trl-compare-") as tmp:
        config = SFTConfig(
            output_dir=tmp, max_steps=args.steps, per_device_train_batch_size=args.rows, gradient_accumulation_steps=1,
            max_grad_norm=1.0, learning_rate=args.lr, bf16=False, fp16=False, use_cpu=True,
            gradient_checkpointing=False, train_sampling_strategy="sequential", dataloader_num_workers=0,
            max_length=None, packing=False, logging_steps=1, save_strategy="no", report_to=[], seed=0,
            disable_tqdm=True,
        )  # fmt: skip
        trainer = RecordingSFTTrainer(
            model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
            optimizers=(optimizer, scheduler), callbacks=[StepTimer()],
        )  # fmt: skip
        rss_before = rss_mib()
        started = time.perf_counter()
        torch.manual_seed(0)
        trainer.train()
        train_s = time.perf_counter() - started
    return {"losses": losses, "step_s": step_s, "train_s": train_s, "rss_before_train_mib": rss_before}


def worker(args: argparse.Namespace) -> None:
    """One engine in this process; writes its record to ``args.out``."""
    record = (run_nemoforge if args.worker == "nemoforge" else run_trl)(args)
    record["peak_rss_mib"] = peak_rss_mib()
    Path(args.out).write_text(json.dumps(record))


def versions() -> dict:
    from importlib.metadata import version

    return {name: version(name) for name in ("torch", "transformers", "accelerate", "datasets", "trl")}


def driver(args: argparse.Namespace) -> None:
    """Run both engines one after the other, compare, print and write the report."""
    import platform

    from nemoforge.config import SFTConfig
    from nemoforge.stages.sft.stage import assistant_tokens

    out_path = RESULTS / ("sft_engine_compare-smoke.json" if args.smoke else "sft_engine_compare.json")
    forwarded = [
        "--rows", str(args.rows), "--seq", str(args.seq), "--steps", str(args.steps), "--warmup", str(args.warmup),
        "--samples", str(args.samples), "--operations", str(args.operations), "--lr", str(args.lr),
        "--warmup-lr-steps", str(args.warmup_lr_steps), *(["--smoke"] if args.smoke else []),
    ]  # fmt: skip
    runs: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="nemoforge-engine-compare-") as tmp:
        for engine in ENGINES:
            out = Path(tmp) / f"{engine}.json"
            subprocess.run(
                [sys.executable, __file__, "--worker", engine, "--out", str(out), *forwarded], check=True
            )
            runs[engine] = json.loads(out.read_text())
    _, ids_NT, _, global_batches = inputs(args)
    row_tokens = args.rows * ids_NT.shape[1]
    for run in runs.values():
        timed = run["step_s"][args.warmup :]
        run["median_step_s"] = statistics.median(timed)
        run["tokens_per_s"] = row_tokens / run["median_step_s"]
    ours, theirs = runs["nemoforge"]["losses"], runs["trl"]["losses"]
    report = {
        "command": " ".join(["python", *sys.argv]),
        "device": f"cpu ({platform.processor() or platform.machine()}), {torch.get_num_threads()} torch threads",
        "python": platform.python_version(),
        "versions": versions(),
        "model": "DeciLMForCausalLM (all-parent Llama), "
        + ("tiny" if args.smoke else "SmolLM2-135M shape")
        + f", {sum(p.numel() for p in build_model(args, ids_NT.shape[1]).parameters())} params, float32",
        "rows_per_update": args.rows,
        "row_tokens": int(ids_NT.shape[1]),
        "assistant_tokens_per_update": [assistant_tokens(b) for b in global_batches],
        "updates": args.steps,
        "timed_after_warmup_updates": args.warmup,
        "optimizer": {
            "name": "AdamW (nemoforge build_optimizer on both)",
            "lr": args.lr,
            "warmup_steps": args.warmup_lr_steps,
            "min_lr_ratio": SFTConfig.model_fields["min_lr_ratio"].default,
            "grad_clip_norm": 1.0,
        },  # fmt: skip
        "precision": "float32 (the sft stage on CPU: mixed_precision auto = no autocast)",
        "engines": runs,
        "loss_step0_abs_diff": abs(ours[0] - theirs[0]),
        "loss_curve_max_abs_diff": max(abs(a - b) for a, b in zip(ours, theirs, strict=True)),
        "trl_over_nemoforge_step_time": runs["trl"]["median_step_s"] / runs["nemoforge"]["median_step_s"],
    }
    for engine, run in runs.items():
        print(f"{engine:9s}: {run['tokens_per_s']:.0f} tokens/s (median step {run['median_step_s']:.3f} s), "
              f"train() {run['train_s']:.1f} s, peak RSS {run['peak_rss_mib']:.0f} MiB, "
              f"loss {run['losses'][0]:.5f} -> {run['losses'][-1]:.5f}")  # fmt: skip
    print(f"loss at step 0 differs by {report['loss_step0_abs_diff']:.2e}; "
          f"curves by at most {report['loss_curve_max_abs_diff']:.2e}")  # fmt: skip
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out_path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny model, short chats: seconds")
    parser.add_argument("--rows", type=int, default=2, help="chats (rows) per update (default 2)")
    parser.add_argument("--seq", type=int, default=256, help="tokens per row at most (default 256)")
    parser.add_argument("--steps", type=int, help="updates (default 6; smoke 4)")
    parser.add_argument(
        "--warmup", type=int, help="updates left out of the step-time median (default 2; smoke 1)"
    )
    parser.add_argument("--samples", type=int, default=64, help="generated chats (default 64)")
    parser.add_argument("--operations", type=int, help="operations per arithmetic problem (default 2)")
    parser.add_argument("--lr", type=float, default=1e-4, help="peak LR (default 1e-4: the sft default)")
    parser.add_argument("--warmup-lr-steps", type=int, default=2, help="linear LR warmup updates (default 2)")
    parser.add_argument("--worker", choices=ENGINES, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    for name, full, smoke in (("steps", 6, 4), ("warmup", 2, 1), ("operations", 2, 2)):
        if getattr(args, name) is None:
            setattr(args, name, smoke if args.smoke else full)
    if importlib.util.find_spec("trl") is None:
        print("sft_engine_compare: skipped: trl is not importable (pip install trl into a separate target and put it "
              "on PYTHONPATH; the project venv does not carry it)")  # fmt: skip
        return
    (worker if args.worker else driver)(args)


if __name__ == "__main__":
    main()
