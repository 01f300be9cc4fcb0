"""A tiny causal-LM training run for tests/test_training_distributed.py, under torchrun or as one process.

Emulates a training stage on a cluster: every rank fetches the newest checkpoint from the store into its
own local directory, trains with :func:`nemoforge.training.loop.train`, and uploads checkpoints through
``on_checkpoint``. Rank 0 writes ``params.safetensors`` (the final weights) and ``result.json``; every rank
appends the callbacks it received to ``calls-rank<r>.jsonl``. ``--stop-at I`` makes ``batches(I)`` raise
on every rank (a crash after the checkpoint of step I), and the process exits 3.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

VOCAB = 64


class Crash(RuntimeError):
    """Raised by the batch function at ``--stop-at``."""


def tiny_model() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--store", type=Path, required=True)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--stop-at", type=int, default=-1)
    args = parser.parse_args()

    from nemoforge.training import distributed

    ctx = distributed.init_from_env()
    try:
        return run(args, ctx)
    finally:
        # as nemoforge.cluster.worker does: every rank reaches the end before any leaves the group (a rank
        # that exits while another's gloo/DeepSpeed threads still talk to it can abort with SIGABRT)
        distributed.barrier()
        distributed.shutdown()


def run(args: argparse.Namespace, ctx) -> int:
    from nemoforge.artifacts.local import LocalStore
    from nemoforge.config import TrainConfig
    from nemoforge.stages.training import fetch_latest_checkpoint
    from nemoforge.training import distributed
    from nemoforge.training.loop import epoch_batches, train
    from nemoforge.training.losses import causal_lm_loss_BT

    rank = ctx.rank if ctx else 0
    store = LocalStore(str(args.store))
    local_dir = args.work / f"rank-{rank}"
    fetched = fetch_latest_checkpoint(store, str(args.store / "checkpoints"), local_dir)

    cfg = TrainConfig(steps=args.steps, batch_size=4, lr=1e-3, warmup_steps=1, checkpoint_every_steps=3)
    starts = torch.randint(0, VOCAB, (10, 1), generator=torch.Generator().manual_seed(1))
    rows = epoch_batches((starts + torch.arange(16)) % VOCAB, cfg.batch_size, seed=0)

    def batches(i: int) -> torch.Tensor:
        if i == args.stop_at:
            raise Crash(f"crash before update {i}")
        return rows(i)

    def loss_fn(model: torch.nn.Module, input_ids_BT: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        # as the chunked cross-entropy of cpt: the trunk, then the LM head's weight read directly (under
        # ZeRO-3 that weight lives outside any module's forward)
        hidden_BTD = model.base_model(input_ids=input_ids_BT, use_cache=False).last_hidden_state
        logits_BTV = hidden_BTD @ model.get_output_embeddings().weight.T
        return causal_lm_loss_BT(logits_BTV, input_ids_BT).mean(), {}

    calls = args.out / f"calls-rank{rank}.jsonl"

    def record(kind: str, value: object) -> None:
        with calls.open("a") as fh:
            fh.write(json.dumps({"kind": kind, "value": value}) + "\n")

    def upload(path: Path) -> None:
        record("checkpoint", path.name)
        store.put(path, f"{args.store}/checkpoints/{path.name}")

    model = tiny_model()
    try:
        state = train(
            model,
            loss_fn,
            batches,
            cfg,
            seed=0, checkpoint_dir=local_dir,
            desc="tiny",
            on_log=lambda step, metrics: record("log", [step, metrics["loss"]]),
            on_checkpoint=upload,
        )
    except Crash:
        return 3
    # every rank must end with the same weights: compare each rank's with rank 0's
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    spread = 0.0
    if ctx is not None:
        reference = flat.clone()
        torch.distributed.broadcast(reference, src=0)
        spread = (flat - reference).abs().max()
        torch.distributed.all_reduce(spread, op=torch.distributed.ReduceOp.MAX)
        spread = float(spread)
    if rank == 0:
        from safetensors.torch import save_model

        save_model(model, str(args.out / "params.safetensors"))
        result = {
            "world_size": ctx.world_size if ctx else 1,
            "engine": distributed.engine_kind() if ctx else "single",
            "fetched_step": fetched,
            "resumed_from_step": state.resumed_from_step,
            "step": state.step,
            "loss": state.history["loss"],
            "rank_spread": spread,
            "pid": os.getpid(),
        }
        (args.out / "result.json").write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
