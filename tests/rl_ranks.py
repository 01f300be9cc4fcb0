"""One rl training phase for tests/test_rl_distributed.py, under torchrun or as one process.

``--phase preference``: :func:`~nemoforge.stages.rl.stage.preference_phase` (DPO + RPO's NLL) on the given pairs.
Every rank loads the same tiny model, fetches checkpoints into its own directory and trains its share of each
global batch; rank 0 writes ``params.safetensors`` (the final weights) and ``history.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--phase", choices=["preference"], required=True)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--pairs", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    from nemoforge.training import distributed

    ctx = distributed.init_from_env()
    try:
        history, params = preference(args, 0 if ctx is None else ctx.rank)
        if distributed.is_main_process():
            save_file(params, str(args.out / "params.safetensors"))
            (args.out / "history.json").write_text(json.dumps(history))
    finally:
        distributed.barrier()  # as nemoforge.cluster.worker: nobody leaves the group while another still talks
        distributed.shutdown()
    return 0


def preference(args: argparse.Namespace, rank: int) -> tuple[dict, dict]:
    """The preference pass on 4 pairs per update (3 updates over 10 pairs: one batch crosses an epoch)."""
    from transformers import AutoTokenizer

    from nemoforge.artifacts import LocalStore
    from nemoforge.config import Recipe
    from nemoforge.models.convert import load_causal_lm
    from nemoforge.stages.rl.stage import preference_phase

    recipe = Recipe(
        name="test",
        data={"preference_uri": str(args.pairs)},
        rl={"preference": {"enabled": True, "steps": 3, "batch_size": 4, "num_pairs": 10, "warmup_steps": 0,
                           "max_len_tokens": 96, "lr": 1e-3, "nll_weight": 0.1, "checkpoint_every_steps": 2}},
    )  # fmt: skip
    model = load_causal_lm(args.model, dtype=torch.float32)
    ref_model = load_causal_lm(args.model, dtype=torch.float32).eval().requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    store = LocalStore(str(args.out / "store"))
    state = preference_phase(
        model, ref_model, tokenizer, recipe, store=store, checkpoints_uri=str(args.out / "store" / "checkpoints"),
        work=args.out / f"rank-{rank}", on_log=None, device=torch.device("cpu"),
    )  # fmt: skip
    return state.history, {k: v.clone() for k, v in model.state_dict().items()}


if __name__ == "__main__":
    raise SystemExit(main())
