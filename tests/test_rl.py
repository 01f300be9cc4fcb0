"""GRPO and DPO losses on literal tensors; a few GRPO steps on a tiny model raise a trivially learnable reward."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from nemoforge.stages.rl.losses import clipped_policy_loss, dpo_loss, group_advantages


def test_group_advantages_are_normalized_per_group():
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0]), 4, eps=0.0)
    s = math.sqrt(1 / 3)  # unbiased std of [1, 0, 0, 1]
    expected = [0.5 / s, -0.5 / s, -0.5 / s, 0.5 / s]
    assert torch.allclose(adv[:4], torch.tensor(expected))
    assert torch.equal(adv[4:], torch.zeros(4))  # equal rewards: no signal
    assert torch.allclose(group_advantages(torch.tensor([3.0, 1.0]), 2, eps=0.0), torch.tensor([1 / math.sqrt(2), -1 / math.sqrt(2)]))


def test_clipped_ratio_loss_on_literal_tensors():
    old = torch.zeros(2, 3)
    logp = torch.log(torch.tensor([[1.5, 1.0, 0.5], [1.5, 1.0, 0.5]])).requires_grad_()
    adv = torch.tensor([1.0, -1.0])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    loss, stats = clipped_policy_loss(logp, old, adv, mask, epsilon=0.2)
    # row 0 (A=+1): min(r, clip(r)) = 1.2, 1.0, 0.5 ; row 1 (A=-1): -max... -min(-r, -clip(r)) = max(r, clip(r)) = 1.5, 1.0
    per_token = [-1.2, -1.0, -0.5, 1.5, 1.0]
    assert loss.item() == pytest.approx(sum(per_token) / 5)
    assert stats["clip_fraction"] == pytest.approx(3 / 5)  # 1.5, 0.5, 1.5 lie outside [0.8, 1.2]; row 1 token 2 masked
    loss.backward()
    # clipped terms carry no gradient: row 0 token 0 (1.5 clipped to 1.2, A>0)
    assert logp.grad[0, 0] == 0 and logp.grad[1, 0] != 0
    # with the reference at the policy, the k3 KL is zero and adds nothing
    again, stats = clipped_policy_loss(logp, old, adv, mask, epsilon=0.2, ref_logp_NT=logp.detach(), beta=0.5)
    assert again.item() == pytest.approx(loss.item()) and stats["kl"] == pytest.approx(0.0)
    kl_only, stats = clipped_policy_loss(
        torch.zeros(1, 1), torch.zeros(1, 1), torch.zeros(1), torch.ones(1, 1), epsilon=0.2,
        ref_logp_NT=torch.tensor([[math.log(2.0)]]), beta=1.0,
    )
    assert kl_only.item() == pytest.approx(2.0 - math.log(2.0) - 1.0)  # k3 = e^d - d - 1, d = ref - logp


def test_dpo_loss_on_literal_logps():
    loss, stats = dpo_loss(
        torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -1.0]), torch.tensor([-2.0, -2.0]), torch.tensor([-2.0, -2.0]),
        beta=0.5,
    )
    # margins: 0.5*((−1+2)−(−3+2)) = 1.0 ; 0.5*((−2+2)−(−1+2)) = −0.5
    expected = (-math.log(1 / (1 + math.exp(-1.0))) - math.log(1 / (1 + math.exp(0.5)))) / 2
    assert loss.item() == pytest.approx(expected)
    assert stats["reward_accuracy"] == 0.5 and stats["reward_margin"] == pytest.approx(0.25)


def test_grpo_steps_change_params_and_raise_a_learnable_reward(tiny_llama_dir: Path):
    """Reward = share of completion tokens in the lower half of the vocabulary (about 0.5 at random init)."""
    from transformers import AutoTokenizer

    from nemoforge.config import RLConfig
    from nemoforge.models.convert import load_causal_lm
    from nemoforge.stages.eval.generation import generate_ids
    from nemoforge.stages.rl.losses import token_logps
    from nemoforge.stages.rl.stage import rollout_batch

    torch.manual_seed(0)
    model = load_causal_lm(tiny_llama_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    cfg = RLConfig(steps=8, num_generations=8, max_new_tokens=4, lr=1e-1, warmup_steps=0)
    prompts = [tokenizer.encode("Say x", add_special_tokens=False)] * 2
    half = model.config.vocab_size // 2

    def reward_of(ids: list[int]) -> float:
        return sum(t < half for t in ids) / max(len(ids), 1)

    def mean_reward() -> float:
        ids = generate_ids(model, tokenizer, prompts * 16, max_new_tokens=cfg.max_new_tokens, temperature=1.0, batch_size=32)
        return sum(map(reward_of, ids)) / len(ids)

    before_reward = mean_reward()

    before_params = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    for _ in range(cfg.steps):
        p_ids = [p for p in prompts for _ in range(cfg.num_generations)]
        c_ids = generate_ids(model, tokenizer, p_ids, max_new_tokens=cfg.max_new_tokens, temperature=1.0, batch_size=len(p_ids))
        adv = group_advantages(torch.tensor([reward_of(c) for c in c_ids]), cfg.num_generations)
        ids, attn, comp = rollout_batch(tokenizer, p_ids, c_ids)
        logp = token_logps(model, ids, attn)
        loss, _ = clipped_policy_loss(logp, logp.detach(), adv, comp, epsilon=cfg.epsilon)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert any(not torch.equal(a, b) for a, b in zip(before_params, model.parameters(), strict=True))
    after_reward = mean_reward()
    print("reward before/after", before_reward, after_reward)
    assert after_reward > before_reward + 0.2, (before_reward, after_reward)
