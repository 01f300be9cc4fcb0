"""rl stage end to end on the tiny random Llama: GRPO steps, preference pass, checkpoints, resume."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import write_sft_data

from nemoforge.config import Recipe


def test_rl_stage_runs_grpo_then_dpo_and_resumes(tiny_llama_dir: Path, shared_dir: Path, tmp_path: Path):
    from nemoforge.artifacts import open_store
    from nemoforge.models.convert import load_causal_lm
    from nemoforge.stages.rl import run

    store = open_store(str(tmp_path / "store"))
    output_uri = store.join("run-1", "rl")
    recipe = Recipe(
        name="test",
        data={"preference_uri": str(shared_dir / "data/instruct/llms_from_scratch_preference_data.jsonl")},
        rl={
            "steps": 2, "batch_size": 2, "num_generations": 2, "max_new_tokens": 4, "num_prompts": 4,
            "num_heldout_prompts": 2, "warmup_steps": 0, "checkpoint_every_steps": 2, "filter_samples": 2,
            "beta": 0.01, "heldout_samples": 2,
            "preference": {"enabled": True, "steps": 2, "batch_size": 2, "num_pairs": 4, "warmup_steps": 0,
                           "max_len_tokens": 128, "lr": 1e-3, "nll_weight": 0.1},
        },
    )
    data_uri = write_sft_data(recipe, store, store.join("run-1", "sft", "data"))
    result = run(recipe, model_uri=str(tiny_llama_dir), data_uri=data_uri, output_uri=output_uri, store=store)
    m = result.metrics
    assert m["train_steps"] == 2 and m["preference_steps"] == 2
    assert 0.0 <= m["reward_heldout_before"] <= 1.5 and "reward_accuracy_heldout_after" in m
    # gains paired over the same held-out rows (all scorable here), intervals clustered by question
    assert m["reward_unscorable_fraction_heldout_before"] == m["reward_unscorable_fraction_heldout_after"] == 0
    for gain, before, after in (
        ("reward_heldout_gain", "reward_heldout_before", "reward_heldout_after"),
        ("accuracy_heldout_gain", "reward_accuracy_heldout_before", "reward_accuracy_heldout_after"),
    ):
        assert m[gain] == pytest.approx(m[after] - m[before], abs=1e-6)
        assert m[f"{gain}_ci_low"] <= m[gain] <= m[f"{gain}_ci_high"]
    for mode in ("", "_on", "_off"):  # sampled pass@1, 2 replies per held-out prompt, paired before/after
        gain = m[f"accuracy_heldout_sampled{mode}_gain"]
        assert gain == pytest.approx(
            m[f"accuracy_heldout_sampled{mode}_after"] - m[f"accuracy_heldout_sampled{mode}_before"], abs=1e-6
        )
        assert m[f"accuracy_heldout_sampled{mode}_gain_ci_low"] <= gain <= m[f"accuracy_heldout_sampled{mode}_gain_ci_high"]
    assert (Path(output_uri) / "samples" / "heldout_sampled_after.json").is_file()
    assert [s for s, _ in result.history["reward_mean"]] == [1, 2]
    assert "kl" in result.history and "preference_loss" in result.history
    assert (Path(output_uri) / "checkpoints" / "step-2").is_dir()
    assert (Path(output_uri) / "checkpoints-preference" / "step-2").is_dir()
    assert Path(result.plots["reward_curve"]).is_file()
    load_causal_lm(result.outputs["model"])

    again = run(recipe, model_uri=str(tiny_llama_dir), data_uri=data_uri, output_uri=output_uri, store=store)
    assert again.tags["resumed_from_step"] == "2"
    assert again.digests["model"] == result.digests["model"]

    # the sampled held-out check draws from its own generator: training is the same without it
    greedy_only = recipe.model_copy(update={"rl": recipe.rl.model_copy(update={"heldout_samples": 0})})
    plain = run(greedy_only, model_uri=str(tiny_llama_dir), data_uri=data_uri, output_uri=store.join("run-2", "rl"),
                store=store)
    assert plain.digests["model"] == result.digests["model"]
    assert not any("sampled" in k for k in plain.metrics)


def test_rl_problems_are_disjoint_from_sft_data_and_each_other(tmp_path: Path):
    from nemoforge.artifacts import open_store
    from nemoforge.data.sft_split import load_sft_split, read_sft_split
    from nemoforge.stages.rl.stage import rl_problems

    recipe = Recipe(
        name="test",
        data={"arithmetic": {"num_steps": 1, "max_operand": 4}},  # a small space: sft and rl draw ~10 same prompts
        sft={"num_samples": 400},
        rl={"num_prompts": 48, "num_heldout_prompts": 48},
    )
    store = open_store(str(tmp_path / "store"))
    sft_train, split = load_sft_split(recipe, store)
    # rl reads sft's split from sft's data output: the same problems as from the split in memory
    data_uri = write_sft_data(recipe, store, store.join("run-1", "sft", "data"))
    train, heldout, source = rl_problems(recipe, read_sft_split(store, data_uri), store)
    assert (train, heldout, source) == rl_problems(recipe, split, store)
    train_q, heldout_q = {q for q, _, _ in train}, {q for q, _, _ in heldout}
    assert len(train_q) == 48 and len(heldout_q) == 48 and not train_q & heldout_q
    assert len(heldout) == 96 and {q for q, _, r in heldout if r == "on"} == {q for q, _, r in heldout if r == "off"}
    assert not (train_q | heldout_q) & {s.prompt for s in sft_train + split.heldout}
    assert [r for _, _, r in heldout[:4]] == ["on", "off", "on", "off"]
    assert "steps=1&max_operand=4" in source


def test_round_to_dtype_makes_the_export_lossless(tiny_llama_dir: Path):
    import torch

    from nemoforge.models.convert import load_causal_lm
    from nemoforge.stages.training import round_to_dtype

    model = load_causal_lm(tiny_llama_dir, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1e-5)  # below bfloat16's resolution for most weights: lost by a cast
    before = {k: v.clone() for k, v in model.state_dict().items()}
    round_to_dtype(model, torch.bfloat16)
    after = model.state_dict()
    assert all(v.dtype == torch.float32 for v in after.values())
    assert any(not torch.equal(before[k], after[k]) for k in after)
    for k, v in after.items():
        assert torch.equal(v, v.to(torch.bfloat16).float()), k

