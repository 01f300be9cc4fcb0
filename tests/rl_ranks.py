"""One rl training phase for tests/test_rl_distributed.py, under torchrun or as one process.

``--phase preference``: :func:`~nemoforge.stages.rl.stage.preference_phase` (DPO + RPO's NLL) on the given pairs.
Every rank loads the same tiny model, fetches checkpoints into its own directory and trains its share of each
global batch; rank 0 writes ``params.safetensors`` (the final weights) and ``history.json`` under ``--out``.

``--phase grpo``: :func:`~nemoforge.stages.rl.stage.make_grpo_loss` in the train loop on FIXED rollouts: the
sampler is replaced by completions that depend only on the prompt and their place in its group (lengths 1 to 6
tokens), and the reward by one of the completion's length, so every run sees the same prompts, completions and
rewards whatever the ranks.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--phase", choices=["preference", "grpo"], required=True)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--pairs", type=Path, help="preference pairs (JSONL), for --phase preference")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    from nemoforge.training import distributed

    ctx = distributed.init_from_env()
    try:
        phase = preference if args.phase == "preference" else grpo
        history, params = phase(args, 0 if ctx is None else ctx.rank)
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

    from nemoforge.artifacts.local import LocalStore
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


def fixed_completions(model, tokenizer, prompt_ids: list[list[int]], **_) -> list[list[int]]:
    """Completion ``j`` of a prompt in this call: 1-6 token ids drawn from a generator seeded by the prompt and ``j``."""
    seen: dict[tuple[int, ...], int] = {}
    out = []
    for p in prompt_ids:
        j = seen[tuple(p)] = seen.get(tuple(p), -1) + 1
        g = torch.Generator().manual_seed(sum(p) * 31 + j)
        out.append(torch.randint(10, 200, (int(torch.randint(1, 7, (), generator=g)),), generator=g).tolist())
    return out


def grpo(args: argparse.Namespace, rank: int) -> tuple[dict, dict]:
    """2 GRPO updates of 4 prompts x 3 completions each (k3 KL on), on :func:`fixed_completions`."""
    from transformers import AutoTokenizer

    from nemoforge.config import RLConfig
    from nemoforge.models.convert import load_causal_lm
    from nemoforge.rewards import REWARDS
    from nemoforge.stages.rl import stage
    from nemoforge.training.loop import epoch_batches, train

    stage.generate_ids = fixed_completions
    REWARDS["format"] = lambda completions, **_: [(len(c) % 4) / 3 for c in completions]
    cfg = RLConfig(steps=2, batch_size=4, num_generations=3, max_new_tokens=6, lr=1e-3, warmup_steps=0, beta=0.05,
                   reward_weights={"format": 1.0}, checkpoint_every_steps=2)  # fmt: skip
    model = load_causal_lm(args.model, dtype=torch.float32)
    ref_model = load_causal_lm(args.model, dtype=torch.float32).eval().requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    problems = [(f"Say something {i}.", "0", "off") for i in range(4)]
    state = train(
        model, stage.make_grpo_loss(problems, tokenizer, cfg, ref_model),
        epoch_batches(torch.arange(len(problems))[:, None], cfg.batch_size, seed=0), cfg,
        seed=0, checkpoint_dir=args.out / f"rank-{rank}", desc="rl",
    )  # fmt: skip
    return state.history, {k: v.clone() for k, v in model.state_dict().items()}


if __name__ == "__main__":
    raise SystemExit(main())
