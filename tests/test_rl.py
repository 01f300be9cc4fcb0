"""GRPO and DPO losses on literal tensors; a few GRPO steps on a tiny model raise a trivially learnable reward."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from nemoforge.stages.rl.losses import clipped_policy_loss, dpo_loss, group_advantages


def test_group_advantages_are_normalized_per_group():
    adv, zero_std = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0]), 4, eps=0.0)
    s = math.sqrt(1 / 3)  # unbiased std of [1, 0, 0, 1]
    expected = [0.5 / s, -0.5 / s, -0.5 / s, 0.5 / s]
    assert torch.allclose(adv[:4], torch.tensor(expected))
    assert torch.equal(adv[4:], torch.zeros(4))  # equal rewards: no signal
    assert zero_std.tolist() == [False, True]
    adv2, _ = group_advantages(torch.tensor([3.0, 1.0]), 2, eps=0.0)
    assert torch.allclose(adv2, torch.tensor([1 / math.sqrt(2), -1 / math.sqrt(2)]))


def test_unscorable_rows_leave_the_group_statistics_and_get_zero_advantage():
    nan = float("nan")
    rewards = torch.tensor([1.0, nan, 0.0, 0.0, nan, nan, nan, 1.0, nan, 2.0, 2.0, nan])
    adv, zero_std = group_advantages(rewards, 4, eps=0.0)
    # group 0: mean and std of [1, 0, 0] only (an unscorable 0 would have made it [1, 0, 0, 0])
    mean, std = 1 / 3, math.sqrt(((2 / 3) ** 2 + 2 * (1 / 3) ** 2) / 2)
    assert torch.allclose(adv[:4], torch.tensor([(1 - mean) / std, 0.0, -mean / std, -mean / std]))
    assert torch.equal(adv[4:], torch.zeros(8))  # one scorable row; two equal ones: no signal
    assert not adv.isnan().any()
    assert zero_std.tolist() == [False, True, True]
    assert zero_std.float().mean().item() == pytest.approx(2 / 3)  # frac_reward_zero_std


def test_reward_metrics_are_means_over_scorable_rows():
    from nemoforge.stages.rl.stage import reward_metrics

    total = [1.5, None, 0.5, None]
    parts = {"accuracy": [1.0, None, 0.0, None], "format": [1.0, 1.0, 1.0, 0.0]}
    assert reward_metrics(total, parts, total_name="reward_mean") == {
        "reward_mean": 1.0, "reward_accuracy": 0.5, "reward_format": 0.75, "reward_unscorable_fraction": 0.5,
    }
    heldout = reward_metrics([None], {"accuracy": [None]}, total_name="reward_heldout", suffix="_heldout")
    assert heldout == {"reward_unscorable_fraction_heldout": 1.0}  # no mean over no row, not 0


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


def test_kl_pulls_zero_advantage_groups_toward_the_reference():
    """The pinned choice: with every advantage 0, the loss is β·mean k3 over all completion tokens."""
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    ref = torch.log(torch.tensor([[0.5, 0.2, 0.9], [0.1, 0.3, 0.4]]))
    zeros = torch.zeros(2)
    beta = 0.3

    def grad_of(logp_NT: torch.Tensor, **kw) -> tuple[torch.Tensor, float]:
        logp = logp_NT.clone().requires_grad_()
        loss, _ = clipped_policy_loss(logp, logp.detach(), zeros, mask, epsilon=0.2, **kw)
        loss.backward()
        return logp.grad, loss.item()

    policy = torch.log(torch.tensor([[0.4, 0.3, 0.2], [0.2, 0.2, 0.5]]))
    grad, loss = grad_of(policy, ref_logp_NT=ref, beta=beta)
    # d/dlogp of β (e^(ref-logp) - (ref-logp) - 1) / num_tokens = β (1 - e^(ref-logp)) / num_tokens
    expected = beta * (1 - torch.exp(ref - policy)) * mask / mask.sum()
    assert torch.allclose(grad, expected)
    assert grad[0, 0] != 0 and grad[0, 2] == 0  # every completion token is pulled; padding is not
    delta = ref - policy
    assert loss == pytest.approx((beta * (delta.exp() - delta - 1) * mask).sum().item() / 5)
    assert torch.equal(grad_of(ref, ref_logp_NT=ref, beta=beta)[0], torch.zeros(2, 3))  # policy == reference
    assert torch.equal(grad_of(policy)[0], torch.zeros(2, 3))  # β = 0: zero advantages give no gradient


def test_dpo_loss_on_literal_logps():
    loss, stats = dpo_loss(
        torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -1.0]), torch.tensor([-2.0, -2.0]), torch.tensor([-2.0, -2.0]),
        beta=0.5,
    )
    # margins: 0.5*((−1+2)−(−3+2)) = 1.0 ; 0.5*((−2+2)−(−1+2)) = −0.5
    expected = (-math.log(1 / (1 + math.exp(-1.0))) - math.log(1 / (1 + math.exp(0.5)))) / 2
    assert loss.item() == pytest.approx(expected)
    assert stats["reward_accuracy"] == 0.5 and stats["reward_margin"] == pytest.approx(0.25)


def test_token_logps_of_the_last_tokens_equal_the_full_sequence_tail_and_the_mask_marks_completions(
    tiny_llama_dir: Path,
):
    """Computing only the completion columns' logits (the LM-head saving) gives the same log-probs."""
    from transformers import AutoTokenizer

    from nemoforge.models.convert import load_causal_lm
    from nemoforge.stages.rl.losses import token_logps
    from nemoforge.stages.rl.stage import rollout_batch

    model = load_causal_lm(tiny_llama_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    ids, attn, comp = rollout_batch(tokenizer, [[5, 6, 7], [8, 9]], [[10, 11], [12, 13, 14]])
    assert comp.tolist() == [[True, True, False], [True, True, True]]
    assert ids[:, -3:][comp].tolist() == [10, 11, 12, 13, 14]
    full_NT = token_logps(model, ids, attn)
    tail_NC = token_logps(model, ids, attn, num_last=comp.shape[1])
    assert tail_NC.shape == (2, 3)
    torch.testing.assert_close(tail_NC, full_NT[:, -3:], rtol=0, atol=1e-5)
    _, _, empty = rollout_batch(tokenizer, [[5, 6]], [[]])
    assert empty.tolist() == [[False]]
    with pytest.raises(ValueError, match="num_last must be in"):
        token_logps(model, ids, attn, num_last=0)


def test_grpo_steps_change_params_and_raise_a_learnable_reward(tiny_llama_dir: Path):
    """Reward = share of completion tokens in the lower half of the vocabulary (about 0.5 at random init)."""
    from transformers import AutoTokenizer

    from nemoforge.config import RLConfig
    from nemoforge.models.convert import load_causal_lm
    from nemoforge.models.generate import generate_ids
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
        adv, _ = group_advantages(torch.tensor([reward_of(c) for c in c_ids]), cfg.num_generations)
        ids, attn, comp = rollout_batch(tokenizer, p_ids, c_ids)
        logp = token_logps(model, ids, attn, num_last=comp.shape[1])
        loss, _ = clipped_policy_loss(logp, logp.detach(), adv, comp, epsilon=cfg.epsilon)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert any(not torch.equal(a, b) for a, b in zip(before_params, model.parameters(), strict=True))
    after_reward = mean_reward()
    print("reward before/after", before_reward, after_reward)
    assert after_reward > before_reward + 0.2, (before_reward, after_reward)


def test_grpo_step_logs_zero_std_groups_and_gives_unscorable_rows_no_gradient(tiny_llama_dir: Path):
    from transformers import AutoTokenizer

    from nemoforge.config import RLConfig
    from nemoforge.models.convert import load_causal_lm
    from nemoforge.stages.rl.stage import make_grpo_loss

    torch.manual_seed(0)
    model = load_causal_lm(tiny_llama_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    cfg = RLConfig(num_generations=4, max_new_tokens=4, batch_size=2)
    index_B1 = torch.tensor([[0], [1]])

    mixed = [("What is 2+3?", "5", "off"), ("What is 1+1?", None, "off")]  # the second has no reference
    _, metrics = make_grpo_loss(mixed, tokenizer, cfg, None)(model, index_B1)
    assert metrics["reward_unscorable_fraction"] == 0.5
    assert metrics["frac_reward_zero_std"] >= 0.5  # the unscorable group gives no signal
    assert 0.0 <= metrics["reward_accuracy"] <= 1.0 and 0.0 <= metrics["reward_mean"] <= 1.5

    unscorable = [("What is 2+3?", None, "off"), ("What is 1+1?", None, "on")]
    loss, metrics = make_grpo_loss(unscorable, tokenizer, cfg, None)(model, index_B1)
    assert metrics["reward_unscorable_fraction"] == 1.0 and metrics["frac_reward_zero_std"] == 1.0
    assert "reward_mean" not in metrics and "reward_accuracy" not in metrics  # no mean over no row
    assert 0.0 <= metrics["reward_format"] <= 1.0  # format still scored every row
    loss.backward()
    assert loss.item() == 0.0
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())  # β = 0: no gradient at all


def test_heldout_gains_split_by_reasoning_mode_show_a_loss_that_the_mean_hides():
    from nemoforge.stages.rl.stage import heldout_gains

    def rows(on: list[float], off: list[float]) -> list[dict]:
        return [
            {"prompt": f"q{i}-{mode}", "reasoning": mode, "reward": v, "rewards": {"accuracy": v}}
            for mode, values in (("on", on), ("off", off)) for i, v in enumerate(values)
        ]

    before = rows(on=[1.0] * 8, off=[0.0] * 8)
    after = rows(on=[1.0] * 4 + [0.0] * 4, off=[1.0] * 4 + [0.0] * 4)
    m = heldout_gains(before, after)
    assert m["accuracy_heldout_gain"] == pytest.approx(0.0)
    assert m["accuracy_heldout_on_gain"] == pytest.approx(-0.5) and m["accuracy_heldout_on_gain_ci_high"] < 0
    assert m["accuracy_heldout_off_gain"] == pytest.approx(0.5) and m["accuracy_heldout_off_gain_ci_low"] > 0


def test_rl_train_modes_set_the_training_prompts_mode_and_the_heldout_keeps_both():
    from nemoforge.config import load_recipe
    from nemoforge.data.sft_split import load_sft_split
    from nemoforge.errors import RecipeError
    from nemoforge.stages.rl.stage import rl_problems

    def problems(recipe):
        return rl_problems(recipe, load_sft_split(recipe, None)[1], None)

    overrides = ["rl.num_prompts=8", "rl.num_heldout_prompts=6", "rl.batch_size=2", "sft.num_samples=40"]
    train, heldout, _ = problems(load_recipe("smollm2-135m-demo", [*overrides, "rl.train_modes=[on]"]))
    assert [r for _, _, r in train] == ["on"] * 8
    assert [r for _, _, r in heldout] == ["on", "off"] * 6  # each of the 6 held-out problems in both modes
    assert [q for q, _, _ in heldout[::2]] == [q for q, _, _ in heldout[1::2]]
    both, _, _ = problems(load_recipe("smollm2-135m-demo", [*overrides, "rl.train_modes=[on, off]"]))
    assert [r for _, _, r in both] == ["on", "off"] * 4 and [q for q, _, _ in both] == [q for q, _, _ in train]
    with pytest.raises(RecipeError, match="rl.train_modes: List should have at least 1 item"):
        load_recipe("smollm2-135m-demo", ["rl.train_modes=[]"])


def test_grpo_through_the_stage_loss_and_the_train_loop_raises_a_learnable_reward(
    tiny_llama_dir: Path, tmp_path: Path, monkeypatch
):
    """make_grpo_loss + the shared train loop (AdamW, warmup + cosine, clipping, checkpoints), as the rl stage
    runs them. A random tiny model cannot earn the math rewards, so the "format" slot of the reward registry is
    given a reward it can learn: the share of new tokens that start a word (about half at random init)."""
    from transformers import AutoTokenizer

    from nemoforge.config import RLConfig
    from nemoforge.models.convert import load_causal_lm
    from nemoforge.rewards import REWARDS, completion_text
    from nemoforge.stages.chat import generate_chats
    from nemoforge.stages.rl.stage import make_grpo_loss
    from nemoforge.training.loop import epoch_batches, train

    def word_starts(completions, **_):
        return [min(1.0, completion_text(c).count(" ") / 4) for c in completions]

    monkeypatch.setitem(REWARDS, "format", word_starts)
    torch.manual_seed(0)
    model = load_causal_lm(tiny_llama_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    cfg = RLConfig(steps=12, batch_size=2, num_generations=8, max_new_tokens=4, lr=1e-1, warmup_steps=1,
                   reward_weights={"format": 1.0}, checkpoint_every_steps=6)  # fmt: skip
    problems = [(f"Say something {i}.", "0", "off") for i in range(4)]

    def sampled_reward() -> float:
        g = torch.Generator().manual_seed(1)
        replies = generate_chats(model, tokenizer, [(q, r) for q, _, r in problems] * 16, max_new_tokens=4,
                                 temperature=1.0, batch_size=64, generator=g)  # fmt: skip
        return sum(word_starts(replies)) / len(replies)

    before = sampled_reward()
    params_before = [p.detach().clone() for p in model.parameters()]
    state = train(
        model, make_grpo_loss(problems, tokenizer, cfg, ref_model=None),
        epoch_batches(torch.arange(len(problems))[:, None], cfg.batch_size, seed=0), cfg,
        seed=0, checkpoint_dir=tmp_path / "ckpt", desc="rl",
    )  # fmt: skip
    after = sampled_reward()
    rewards = [v for _, v in state.history["reward_mean"]]
    print("sampled reward before/after", before, after, "rollout reward", rewards)
    assert any(not torch.equal(a, b) for a, b in zip(params_before, model.parameters(), strict=True))
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.15, rewards
    assert after > before + 0.2, (before, after)


def test_preference_rows_leave_out_pairs_whose_response_is_cut_away(tiny_llama_dir: Path):
    from transformers import AutoTokenizer

    from nemoforge.errors import NemoforgeError
    from nemoforge.stages.rl.stage import preference_rows

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    short = ("Fix: teh", "the", "teh")
    long = ("word " * 200, "yes", "no")
    ids_2PT, mask_2PT = preference_rows(tokenizer, [long, short, long], max_len=48)
    assert ids_2PT.shape[0] == 2 and mask_2PT[:, 1:].sum(-1).min() >= 1  # the short pair only, both responses
    with pytest.raises(NemoforgeError, match="max_len_tokens=48 cuts every preference response away"):
        preference_rows(tokenizer, [long], max_len=48)
