"""Training throughput on one GPU: nemoforge's training step vs a plain Hugging Face ``Trainer`` step, in one run.

    python benchmarks/train_throughput.py                 # GPU: ~1.2B Llama (Llama-3.2-1B shape), batch 4 x 4096
    python benchmarks/train_throughput.py --smoke         # CPU, tiny shapes, < 1 minute: checks the mechanics

The parent is Llama-shaped (hidden 2048, 16 layers, FFN 8192, 32 heads, 8 KV heads, vocab 128256, tied
embeddings: 1.24B parameters), random init; its Puzzle child has the attention of every 4th layer (3, 7, 11,
15) replaced by ``no_op`` and the FFN of layers 1, 5, 9, 13 halved (8192 -> 4096). All models get the same
random-token batch (``--batch`` rows of ``--seq`` tokens) and train with AdamW (fused on CUDA), LR 1e-4,
gradient clipping at 1.0. Configurations, each in a fresh model:

* ``hf-parent-bf16``: ``transformers.LlamaForCausalLM`` with bf16 weights (and so bf16 AdamW state), SDPA,
  ``Trainer(bf16=True, optim="adamw_torch_fused")``: what the brief's 48.7k tokens/s reference measured.
* ``hf-parent-amp``: the same with float32 weights under the Trainer's bf16 autocast: mixed precision as a
  user gets it from ``Trainer``; the like-for-like baseline of nemoforge's float32-master training.
* ``nemoforge-parent`` / ``nemoforge-child``: the all-parent / child ``DeciLMForCausalLM`` trained by
  :func:`nemoforge.training.loop.train_step` on the single-process engine (the step
  :func:`~nemoforge.training.loop.train` runs) with
  float32 weights and AdamW state, bf16 autocast, the chunked cross-entropy of the cpt stage
  (:func:`~nemoforge.training.losses.causal_lm_loss`: no ``(B, T, V)`` logits), SDPA (flash on the GPU), and
  per-layer ``torch.compile`` (and the compiled softmax of the cross-entropy) unless ``--no-compile``
  (:func:`~nemoforge.training.perf.training_features`).

Each configuration runs ``--warmup`` untimed steps (compilation, autotuning, allocator) then ``--steps`` timed
steps, each ending in a CUDA synchronize; tokens/s = timed tokens / timed wall seconds. MFU counts model FLOPs
from the configuration's block_configs (:func:`~nemoforge.training.flops.training_flops_per_token`: 6 x matmul
params + 12 x attention width x T per attention layer; PaLM App. B) against the device's dense bf16 peak
(H200: 989e12). An out-of-memory or other failure of one configuration is reported in the JSON and the run
goes on. Writes ``benchmarks/results/train_throughput.json`` after each configuration.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import shlex
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from nemoforge.training.flops import peak_flops_per_s, training_flops_per_token

RESULTS = Path(__file__).parent / "results"
CONFIGS = ("hf-parent-bf16", "hf-parent-amp", "nemoforge-parent", "nemoforge-child")

FULL = {"hidden": 2048, "layers": 16, "ffn": 8192, "heads": 32, "kv_heads": 8, "vocab": 128256}
SMOKE = {"hidden": 64, "layers": 4, "ffn": 512, "heads": 4, "kv_heads": 2, "vocab": 512}


def llama_config(shape: dict, seq: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=shape["vocab"], hidden_size=shape["hidden"], intermediate_size=shape["ffn"],
        num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv_heads"], max_position_embeddings=seq, tie_word_embeddings=True,
        rope_theta=500000.0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip


def parent_config(llama):
    """The all-parent ``DeciLMConfig`` of the Llama (nemoforge's model of the parent)."""
    from nemoforge.models.convert import decilm_config_from_llama

    return decilm_config_from_llama(llama)


def child_config(llama):
    """The Puzzle child: attention ``no_op`` in layers 3, 7, 11, ...; FFN halved in layers 1, 5, 9, ..."""
    from nemoforge.models.block_configs import block_config
    from nemoforge.models.convert import decilm_config_from_llama

    group = llama.num_attention_heads // llama.num_key_value_heads
    blocks = [
        block_config(
            None if i % 4 == 3 else group,
            llama.intermediate_size // 2 if i % 4 == 1 else llama.intermediate_size,
            llama.hidden_size,
        )
        for i in range(llama.num_hidden_layers)
    ]
    return decilm_config_from_llama(llama, blocks)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _figures(step_s: list[float], tokens_per_step: int, flops_per_token: float, peak: float | None) -> dict:
    tokens_per_s = tokens_per_step * len(step_s) / sum(step_s)
    return {
        "timed_steps": len(step_s),
        "step_s": [round(s, 4) for s in step_s],
        "tokens_per_s": tokens_per_s,
        "model_tflops_per_s": tokens_per_s * flops_per_token / 1e12,
        "mfu": tokens_per_s * flops_per_token / peak if peak else None,
    }


def run_nemoforge(config, input_ids_BT: torch.Tensor, args, peak: float | None) -> dict:
    """nemoforge's step on a fresh ``DeciLMForCausalLM(config)`` (float32 weights, bf16 autocast on CUDA)."""
    from nemoforge.config import TrainConfig
    from nemoforge.models.hf.modeling_decilm import DeciLMForCausalLM
    from nemoforge.training.loop import parallelize, train_step
    from nemoforge.training.losses import causal_lm_loss
    from nemoforge.training.perf import training_features

    device = input_ids_BT.device
    cfg = TrainConfig(
        steps=args.warmup + args.steps, lr=1e-4, warmup_steps=1, batch_size=input_ids_BT.shape[0],
        compile=args.compile, activation_checkpointing=args.activation_checkpointing,
    )  # fmt: skip
    torch.manual_seed(0)
    with device:
        model = DeciLMForCausalLM(config)
    model.train()
    loss_fn = lambda m, ids: (causal_lm_loss(m, ids, compiled=cfg.compile), {})  # noqa: E731
    engine = parallelize(model, loss_fn, cfg, device)  # one process: AdamW (fused on CUDA) and its schedule
    step_s, losses = [], []
    with training_features(model, activation_checkpointing=cfg.activation_checkpointing, compile=cfg.compile):
        for step in range(1, cfg.steps + 1):
            started = time.perf_counter()
            metrics = train_step(engine, input_ids_BT, desc="bench", step=step)
            _sync(device)
            elapsed = time.perf_counter() - started
            losses.append(metrics["loss"])
            if step > args.warmup:
                step_s.append(elapsed)
            elif args.verbose:
                print(f"  warm-up step {step}: {elapsed:.2f} s", flush=True)
    num_params = sum(p.numel() for p in model.parameters())
    del model, engine
    return {"params": num_params, "loss_first": losses[0], "loss_last": losses[-1],
            "compile": cfg.compile, "activation_checkpointing": cfg.activation_checkpointing,
            "precision": "fp32 weights + AdamW state, bf16 autocast" if device.type == "cuda" else "fp32",
            **_figures(step_s, input_ids_BT.numel(), training_flops_per_token(config, input_ids_BT.shape[1]), peak)}  # fmt: skip


def run_hf(llama, input_ids_BT: torch.Tensor, args, peak: float | None, *, bf16_weights: bool) -> dict:
    """A plain ``transformers.Trainer`` on a fresh ``LlamaForCausalLM`` (SDPA; bf16 autocast on CUDA)."""
    from transformers import LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

    device = input_ids_BT.device
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    with device:
        model = LlamaForCausalLM(llama)
    if bf16_weights:
        model = model.to(torch.bfloat16)
    rows = input_ids_BT.cpu()
    batch = rows.shape[0]

    class Rows(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return batch * (args.warmup + args.steps)

        def __getitem__(self, i: int) -> dict:
            return {"input_ids": rows[i % batch], "labels": rows[i % batch]}

    ends: list[float] = []
    losses: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, a, state, control, **kwargs):
            _sync(device)
            ends.append(time.perf_counter())

        def on_log(self, a, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses.append(logs["loss"])

    with tempfile.TemporaryDirectory() as tmp:
        training_args = TrainingArguments(
            output_dir=tmp, max_steps=args.warmup + args.steps, per_device_train_batch_size=batch,
            learning_rate=1e-4, warmup_steps=1, max_grad_norm=1.0, bf16=cuda,
            optim="adamw_torch_fused" if cuda else "adamw_torch", logging_steps=1, save_strategy="no",
            report_to="none", disable_tqdm=True, dataloader_num_workers=0, use_cpu=not cuda,
            gradient_checkpointing=args.activation_checkpointing, seed=0,
        )  # fmt: skip
        trainer = Trainer(model=model, args=training_args, train_dataset=Rows(), callbacks=[Clock()])
        _sync(device)
        started = time.perf_counter()
        trainer.train()
    starts = [started, *ends[:-1]]
    step_s = [end - start for start, end in zip(starts, ends, strict=True)][args.warmup :]
    num_params = sum(p.numel() for p in model.parameters())
    attention = model.config._attn_implementation
    del trainer, model
    return {"params": num_params, "attention": attention, "loss_first": losses[0] if losses else None,
            "loss_last": losses[-1] if losses else None,
            "precision": ("bf16 weights + AdamW state" if bf16_weights else "fp32 weights + AdamW state")
            + (", bf16 autocast" if cuda else ""),
            **_figures(step_s, input_ids_BT.numel(), training_flops_per_token(llama, input_ids_BT.shape[1]), peak)}  # fmt: skip


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (hidden 64, 4 layers, seq 64, batch 2)")
    parser.add_argument("--batch", type=int, help="rows per step (default 4; smoke 2)")
    parser.add_argument("--seq", type=int, help="tokens per row (default 4096; smoke 64)")
    parser.add_argument("--steps", type=int, help="timed steps per configuration (default 10; smoke 2)")
    parser.add_argument("--warmup", type=int, help="untimed steps first (default 3; smoke 1)")
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated subset of {CONFIGS}")
    parser.add_argument("--no-compile", dest="compile", action="store_false", default=None,
                        help="nemoforge without torch.compile (default: compile on CUDA, not on the CPU)")  # fmt: skip
    parser.add_argument("--activation-checkpointing", action="store_true", help="in every configuration")
    parser.add_argument("--peak-flops", type=float, help="peak FLOP/s for MFU (default: looked up for the GPU)")
    parser.add_argument("--verbose", action="store_true", help="print warm-up step times")
    parser.add_argument("--out", type=Path, help="JSON path (default results/train_throughput.json; smoke: in /tmp)")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    smoke = args.smoke
    args.batch = args.batch or (2 if smoke else 4)
    args.seq = args.seq or (64 if smoke else 4096)
    args.steps = args.steps or (2 if smoke else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if smoke else 3)
    if args.out is None:
        args.out = Path(tempfile.gettempdir()) / "train_throughput_smoke.json" if smoke else RESULTS / "train_throughput.json"
    if args.compile is None:
        args.compile = device.type == "cuda"
    configs = [c for c in args.configs.split(",") if c]
    unknown = sorted(set(configs) - set(CONFIGS))
    if unknown:
        parser.error(f"unknown --configs {unknown}; choose from {CONFIGS}")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # float32 matmuls outside autocast (none in the hot path)
    import transformers

    llama = llama_config(SMOKE if smoke else FULL, args.seq)
    peak = args.peak_flops or peak_flops_per_s(device)
    input_ids_BT = torch.randint(
        0, llama.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(0)
    ).to(device)
    report = {
        "benchmark": "train_throughput",
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "peak_flops_per_s": peak,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version(), "cuda": torch.version.cuda},  # fmt: skip
        "shape": {**(SMOKE if smoke else FULL), "batch": args.batch, "seq": args.seq, "tied_embeddings": True},
        "child_block_configs": "attention no_op in layers 3,7,11,...; FFN halved in layers 1,5,9,...",
        "flops_per_token": {"parent": training_flops_per_token(llama, args.seq),
                            "child": training_flops_per_token(child_config(llama), args.seq)},  # fmt: skip
        "warmup_steps": args.warmup,
        "results": {},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    for name in configs:
        t0 = time.perf_counter()
        print(f"{name}: running", flush=True)
        try:
            if name == "hf-parent-bf16":
                result = run_hf(llama, input_ids_BT, args, peak, bf16_weights=True)
            elif name == "hf-parent-amp":
                result = run_hf(llama, input_ids_BT, args, peak, bf16_weights=False)
            else:
                config = child_config(llama) if name.endswith("child") else parent_config(llama)
                result = run_nemoforge(config, input_ids_BT, args, peak)
            if device.type == "cuda":
                result["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        except torch.OutOfMemoryError as e:
            result = {"error": f"out of memory: {str(e).splitlines()[0]}"}
        except Exception as e:  # one configuration's failure (e.g. a compile error) must not lose the others
            result = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(limit=6)}
        result["wall_s"] = time.perf_counter() - t0
        report["results"][name] = result
        _free(device)
        print(f"{name}: " + json.dumps({k: v for k, v in result.items() if k not in ("step_s", "traceback")}),
              flush=True)  # fmt: skip
        report["ratios"] = _ratios(report["results"])
        report["total_wall_s"] = time.perf_counter() - started
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    _print_table(report)
    print(f"wrote {args.out}")


def _ratios(results: dict) -> dict:
    """tokens/s of nemoforge's parent and child over each Hugging Face baseline (same model, batch, length)."""
    tps = {k: v.get("tokens_per_s") for k, v in results.items()}
    return {
        f"{ours}/{base}": tps[ours] / tps[base]
        for ours in ("nemoforge-parent", "nemoforge-child")
        for base in ("hf-parent-bf16", "hf-parent-amp", "nemoforge-parent")
        if ours != base and tps.get(ours) and tps.get(base)
    }


def _print_table(report: dict) -> None:
    print(f"\n{report['device']}  batch {report['shape']['batch']} x {report['shape']['seq']}")
    print(f"{'config':18} {'tokens/s':>10} {'TFLOP/s':>8} {'MFU':>6} {'peak GiB':>8}")
    for name, r in report["results"].items():
        if "error" in r:
            print(f"{name:18} {r['error'][:60]}")
            continue
        mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "-"
        mem = f"{r['peak_memory_gib']:.1f}" if "peak_memory_gib" in r else "-"
        print(f"{name:18} {r['tokens_per_s']:>10.0f} {r['model_tflops_per_s']:>8.1f} {mfu:>6} {mem:>8}")
    for key, value in report["ratios"].items():
        print(f"  {key}: {value:.2f}x")


if __name__ == "__main__":
    main()
