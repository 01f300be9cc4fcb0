"""Weak scaling of distill over N GPUs of one host: tokens/s of the training layer under torchrun.

    python benchmarks/scaling.py --nproc 1 2 4 8              # GPUs: ~1.2B child, ZeRO-3 when deepspeed is there
    python benchmarks/scaling.py --smoke                      # CPU, gloo, tiny shapes, N = 1 2: checks the mechanics

For each N of ``--nproc`` the driver starts ``python -m torch.distributed.run --standalone --nproc_per_node N``
on this file in ``--worker`` mode and reads rank 0's measurement. Each worker builds the same random-init
models: a Llama-shaped parent (hidden 2048, 16 layers, FFN 8192, 32 heads, 8 KV heads, vocab 128256, tied
embeddings: Llama-3.2-1B's shape, 1.24B parameters) as the frozen teacher in bf16, and its Puzzle child (attention
``no_op`` in layers 3, 7, 11, 15; FFN halved in layers 1, 5, 9, 13) as the student in float32; then runs
:func:`nemoforge.training.loop.train` with the distill stage's loss
(:func:`~nemoforge.training.losses.gkd_loss`: per-layer hidden cosine + KL, weights 1) for ``--warmup`` +
``--steps`` updates. With N > 1 its engine (:func:`~nemoforge.training.loop.parallelize`) is DeepSpeed
ZeRO-3 (bf16, no offload, activation checkpointing; the stage's default config for N GPUs) when deepspeed is
importable and CUDA is present, else DDP (``--engine`` forces one); N = 1 is the single-process loop a
one-GPU user runs.

Weak scaling: every rank gets ``--micro-batch`` rows of ``--seq`` random tokens per update, so the global batch
is ``N x micro-batch``. tokens/s of an update = global tokens / its wall time (CUDA-synchronized), the median
over the timed updates (the warm-up ones and the checkpoint written after the last one are excluded).
Weak-scaling efficiency of N = tokens/s(N) / (N / N0 x tokens/s(N0)), N0 the smallest N measured (issue 8's
goal: >= 0.85 from 1 to the largest N). Writes ``benchmarks/results/scaling.json`` (``scaling-smoke.json`` with
``--smoke``) after each N. NVLink multicast stays off (NCCL_NVLS_ENABLE=0 and its PyTorch and NVSHMEM
counterparts are set for the workers).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
FULL = {"hidden": 2048, "layers": 16, "ffn": 8192, "heads": 32, "kv_heads": 8, "vocab": 128256}
SMOKE = {"hidden": 64, "layers": 4, "ffn": 512, "heads": 4, "kv_heads": 2, "vocab": 256}
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def models(shape: dict, seq: int, device: torch.device) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(frozen bf16 parent on ``device``, float32 Puzzle child on ``device``), random init, seed 0."""
    from transformers import LlamaConfig

    from nemoforge.models.block_configs import block_config
    from nemoforge.models.convert import decilm_config_from_llama
    from nemoforge.models.hf.modeling_decilm import DeciLMForCausalLM

    llama = LlamaConfig(
        vocab_size=shape["vocab"], hidden_size=shape["hidden"], intermediate_size=shape["ffn"],
        num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv_heads"], max_position_embeddings=seq, tie_word_embeddings=True,
        rope_theta=500000.0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    group = shape["heads"] // shape["kv_heads"]
    blocks = [
        block_config(None if i % 4 == 3 else group, shape["ffn"] // 2 if i % 4 == 1 else shape["ffn"], shape["hidden"])
        for i in range(shape["layers"])
    ]
    torch.manual_seed(0)
    teacher_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    parent = DeciLMForCausalLM(decilm_config_from_llama(llama)).to(device, teacher_dtype).eval().requires_grad_(False)
    child = DeciLMForCausalLM(decilm_config_from_llama(llama, blocks)).to(device)
    return parent, child


def worker(args: argparse.Namespace) -> None:
    """One rank: distill for warmup + steps updates; rank 0 writes its measurement to ``args.out``."""
    from nemoforge.config import TrainConfig
    from nemoforge.runtime import compute_device
    from nemoforge.training import distributed
    from nemoforge.training.loop import train
    from nemoforge.training.losses import gkd_loss

    ctx = distributed.init_from_env()
    num_ranks = ctx.world_size if ctx else 1
    shape = SMOKE if args.smoke else FULL
    device = compute_device()
    parent, child = models(shape, args.seq, device)
    global_batch = num_ranks * args.micro_batch
    cfg = TrainConfig(
        steps=args.warmup + args.steps, batch_size=global_batch, lr=1e-5, warmup_steps=1,
        checkpoint_every_steps=10**9, log_every_steps=1,
    )  # fmt: skip

    def batches(i: int) -> torch.Tensor:
        return torch.randint(shape["vocab"], (global_batch, args.seq), generator=torch.Generator().manual_seed(i))

    def loss_fn(model: torch.nn.Module, input_ids_BT: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        with torch.no_grad():
            parent_out = parent(input_ids_BT, output_hidden_states=True, use_cache=False)
        child_out = model(input_ids_BT, output_hidden_states=True, use_cache=False)
        return gkd_loss(
            child_out.logits, parent_out.logits, child_out.hidden_states[1:], parent_out.hidden_states[1:],
            cosine_weight=1.0, kl_weight=1.0, temperature=1.0,
        )  # fmt: skip

    with tempfile.TemporaryDirectory(prefix="nemoforge-scaling-") as tmp:
        state = train(child, loss_fn, batches, cfg, seed=0, checkpoint_dir=Path(tmp), desc=f"scaling N={num_ranks}")
    timed_tokens_per_s = timed(state.history, "tokens_per_s", args.warmup)
    if ctx is None or ctx.is_main:
        record = {
            "nproc": num_ranks,
            "engine": (distributed.engine_kind() if ctx else "single-process"),
            "tokens_per_s": statistics.median(timed_tokens_per_s),
            "tokens_per_s_all_steps": timed_tokens_per_s,
            "global_batch_rows": global_batch,
            "child_params": sum(p.numel() for p in child.parameters()),
            "loss_first": state.history["loss"][0][1],
            "loss_last": state.history["loss"][-1][1],
            "peak_gpu_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
        }
        Path(args.out).write_text(json.dumps(record))
    distributed.shutdown()


def environment(command: list[str]) -> dict:
    """The report's header: command, start time, host, device and versions (torch, transformers, deepspeed)."""
    import transformers

    try:
        import deepspeed

        deepspeed_version = deepspeed.__version__
    except ImportError:
        deepspeed_version = None
    return {
        "command": shlex.join(command),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": platform.node(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "deepspeed": deepspeed_version,
    }


def worker_env(*, smoke: bool, engine: str | None = None) -> dict[str, str]:
    """The workers' environment: NVLink multicast off, no progress bars, the engine forced when asked; on the
    smoke's shared CPU one OpenMP thread per rank."""
    env = os.environ | NO_MULTICAST | {"NEMOFORGE_NO_PROGRESS": "1"}
    if engine:
        env["NEMOFORGE_DISTRIBUTED_ENGINE"] = engine
    if smoke:
        env.setdefault("OMP_NUM_THREADS", "1")
    return env


def run_under_torchrun(script: str, nproc: int, worker_argv: list[str], env: dict[str, str], tmp: Path) -> dict:
    """``python -m torch.distributed.run --standalone --nproc_per_node nproc script --worker --out R *worker_argv``;
    ``{"nproc", "wall_s"}`` with rank 0's measurement (the JSON it wrote to ``R``), or with ``error`` (the
    output's tail) when the job failed."""
    result_path = tmp / f"n{nproc}.json"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
        script, "--worker", "--out", str(result_path), *worker_argv,
    ]  # fmt: skip
    started = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    run = {"nproc": nproc, "wall_s": round(time.perf_counter() - started, 1)}
    if proc.returncode != 0:
        run["error"] = (proc.stderr or proc.stdout)[-8000:]
        print(f"N={nproc}: failed (exit {proc.returncode})", file=sys.stderr)
        return run
    return run | json.loads(result_path.read_text())


def timed(history: dict[str, list[tuple[int, float]]], name: str, warmup: int) -> list[float]:
    """The values of metric ``name`` logged after the first ``warmup`` updates (the timed ones)."""
    return [value for step, value in history[name] if step > warmup]


def driver(args: argparse.Namespace) -> None:
    """Run the workers for each N and write the report with tokens/s and weak-scaling efficiency."""
    out_path = RESULTS / ("scaling-smoke.json" if args.smoke else "scaling.json")
    env = worker_env(smoke=args.smoke, engine=args.engine)
    report: dict = environment([sys.executable, *sys.argv]) | {
        "shape": SMOKE if args.smoke else FULL,
        "seq_tokens": args.seq,
        "micro_batch_rows_per_rank": args.micro_batch,
        "timed_steps": args.steps,
        "warmup_steps": args.warmup,
        "goal_efficiency": 0.85,
        "runs": [],
    }
    with tempfile.TemporaryDirectory(prefix="nemoforge-scaling-") as tmp:
        for nproc in args.nproc:
            worker_argv = [
                "--seq", str(args.seq), "--micro-batch", str(args.micro_batch), "--steps", str(args.steps),
                "--warmup", str(args.warmup), *(["--smoke"] if args.smoke else []),
            ]  # fmt: skip
            run = run_under_torchrun(__file__, nproc, worker_argv, env, Path(tmp))
            if "error" not in run:
                print(f"N={nproc}: {run['tokens_per_s']:.0f} tokens/s ({run['engine']})")
            report["runs"].append(run)
            _efficiency(report)
            RESULTS.mkdir(parents=True, exist_ok=True)
            out_path.write_text(json.dumps(report, indent=2) + "\n")
    for run in report["runs"]:
        if "efficiency" in run:
            print(f"N={run['nproc']}: weak-scaling efficiency {run['efficiency']:.3f}")
    print(f"wrote {out_path}")


def _efficiency(report: dict) -> None:
    """Set each successful run's ``efficiency`` = tokens/s(N) / (N / N0 x tokens/s(N0)), N0 the smallest N."""
    done = [r for r in report["runs"] if "tokens_per_s" in r]
    if not done:
        return
    base = min(done, key=lambda r: r["nproc"])
    for run in done:
        run["efficiency"] = run["tokens_per_s"] / (run["nproc"] / base["nproc"] * base["tokens_per_s"])
    report["efficiency_largest_n"] = max(done, key=lambda r: r["nproc"])["efficiency"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nproc", type=int, nargs="+", help="process (GPU) counts, e.g. 1 2 4 8")
    parser.add_argument("--smoke", action="store_true", help="CPU, gloo, tiny shapes (default N: 1 2)")
    parser.add_argument("--seq", type=int, help="tokens per row (default 2048; smoke 32)")
    parser.add_argument("--micro-batch", type=int, help="rows per rank per update (default 4; smoke 2)")
    parser.add_argument("--steps", type=int, help="timed updates (default 10; smoke 3)")
    parser.add_argument("--warmup", type=int, help="untimed updates first (default 3; smoke 1)")
    parser.add_argument("--engine", choices=("ddp", "deepspeed"), help="force the engine (default: auto)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    defaults = {"nproc": [1, 2], "seq": 32, "micro_batch": 2, "steps": 3, "warmup": 1} if args.smoke else {
        "nproc": [1, 2, 4, 8], "seq": 2048, "micro_batch": 4, "steps": 10, "warmup": 3}  # fmt: skip
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    (worker if args.worker else driver)(args)


if __name__ == "__main__":
    main()
