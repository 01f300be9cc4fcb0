"""Golden loss trajectories: distill's and cpt's losses through the shared train loop, on a fixed tiny model and
fixed token data, pinned to the values this code computed (CPU, float32). A numerical change anywhere on the path
(model, loss, optimizer, schedule, clipping, batch order) moves them and fails here; a deliberate change
regenerates them (run this file with NEMOFORGE_PRINT_GOLDEN=1 and paste the printed lists)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from nemoforge.config import CorpusTrainConfig, DistillConfig
from nemoforge.models.convert import load_causal_lm
from nemoforge.training.loop import epoch_batches, train
from nemoforge.training.losses import causal_lm_loss, gkd_loss

GOLDEN = {
    "cpt": [4.84231, 4.677199, 4.473271, 4.29929, 4.175513, 4.097627, 4.046292, 4.021215],
    "distill": [2.021804, 1.651244, 1.083779, 0.729578, 0.483026, 0.342389, 0.274259, 0.238344],
}


def _tiny_llama(path: Path, seed: int) -> Path:
    """A random-init LlamaForCausalLM: vocab 128, hidden 32, 2 layers, 4 heads / 2 KV, FFN 256."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def _check(name: str, history: dict[str, list[tuple[int, float]]]) -> None:
    losses = [round(v, 6) for _, v in history["loss"]]
    if os.environ.get("NEMOFORGE_PRINT_GOLDEN"):
        print(f'"{name}": {losses},')
    assert losses == pytest.approx(GOLDEN[name], rel=1e-4, abs=1e-5)


@pytest.fixture()
def data_NT() -> torch.Tensor:
    """24 rows of 33 tokens: shifted windows of one random 16-token cycle, so the losses have something to learn."""
    g = torch.Generator().manual_seed(0)
    cycle = torch.randint(0, 128, (16,), generator=g)
    starts_N1 = torch.randint(0, 16, (24, 1), generator=g)
    return cycle[(starts_N1 + torch.arange(33)) % 16]


def test_cpt_loss_trajectory_is_golden(tmp_path: Path, data_NT: torch.Tensor):
    model = load_causal_lm(_tiny_llama(tmp_path / "model", seed=0))
    cfg = CorpusTrainConfig(steps=8, batch_size=4, lr=3e-3, warmup_steps=2, checkpoint_every_steps=8)
    def loss_fn(model: torch.nn.Module, input_ids_BT: torch.Tensor):  # as stages/cpt/stage.py
        return causal_lm_loss(model, input_ids_BT), {}

    state = train(model, loss_fn, epoch_batches(data_NT, 4, seed=0), cfg, seed=0, checkpoint_dir=tmp_path / "c", desc="cpt")
    _check("cpt", state.history)


def test_distill_loss_trajectory_is_golden(tmp_path: Path, data_NT: torch.Tensor):
    parent = load_causal_lm(_tiny_llama(tmp_path / "parent", seed=1)).requires_grad_(False)
    child = load_causal_lm(_tiny_llama(tmp_path / "child", seed=2))
    cfg = DistillConfig(steps=8, batch_size=4, lr=3e-3, warmup_steps=2, checkpoint_every_steps=8)

    def loss_fn(model: torch.nn.Module, input_ids_BT: torch.Tensor):  # as stages/distill/stage.py
        with torch.no_grad():
            parent_out = parent(input_ids_BT, output_hidden_states=True, use_cache=False)
        child_out = model(input_ids_BT, output_hidden_states=True, use_cache=False)
        return gkd_loss(
            child_out.logits, parent_out.logits, child_out.hidden_states[1:], parent_out.hidden_states[1:],
            cosine_weight=cfg.cosine_weight, kl_weight=cfg.kl_weight, temperature=cfg.temperature,
        )  # fmt: skip

    state = train(child, loss_fn, epoch_batches(data_NT, 4, seed=0), cfg, seed=0, checkpoint_dir=tmp_path / "c", desc="distill")
    _check("distill", state.history)
