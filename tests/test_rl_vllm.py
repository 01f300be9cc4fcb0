"""GRPO rollouts by a colocated vLLM engine (rl.rollout_engine=vllm): weight push parity and a short run.

The engine of the parity test is a module fixture; the GRPO test closes it and the stage starts its own
(one in-process engine at a time; the second start is cheaper, vLLM being imported already). ~55 s in all
with `taskset -c 1` on the busy 2-core machine (~80 s cold). The model is a small random one with head size
32: vLLM's CPU attention takes no head size below 32, so conftest's tiny Llama (head size 16) cannot be used.
Skipped when vLLM cannot be imported; marked slow (it starts the real engine).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import write_sft_data

from nemoforge.config import Recipe

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def policy_and_engine(vllm_llama_dir: Path):
    import torch
    from transformers import AutoTokenizer

    from nemoforge.models.convert import load_causal_lm
    from nemoforge.stages.rl.rollout import VLLMRollouts

    model = load_causal_lm(vllm_llama_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(vllm_llama_dir, config=model.config)
    engine = VLLMRollouts(model, tokenizer, max_model_len=256, seed=0)
    yield model, tokenizer, engine
    engine.close()


def _prompts(tokenizer) -> list[list[int]]:
    from nemoforge.data.reasoning import encode_prompt

    return [encode_prompt(tokenizer, q, r) for q, r in (("What is 12 + 30?", "on"), ("Name a prime.", "off"))] + [
        tokenizer("The history of the Roman empire", add_special_tokens=False)["input_ids"]
    ]


def test_pushed_weights_make_vllm_greedy_equal_ours(policy_and_engine):
    import torch

    from nemoforge.models.generate import generate_ids

    model, tokenizer, engine = policy_and_engine
    prompts = _prompts(tokenizer)

    def both() -> tuple[list[list[int]], list[list[int]]]:
        ours = generate_ids(model, tokenizer, prompts, max_new_tokens=12)
        theirs = engine.generate(prompts, n=1, max_new_tokens=12, temperature=0.0)
        return ours, theirs

    ours_before, vllm_before = both()
    assert vllm_before == ours_before
    with torch.no_grad():  # an "optimizer step" that changes the policy: layer 1's FFN output and attention
        model.model.layers[1].mlp.down_proj.weight.mul_(-3.0)
        model.model.layers[1].self_attn.o_proj.weight.zero_()
    _, stale = both()
    assert stale == vllm_before  # not pushed yet: vLLM still samples the old policy
    assert engine.push_weights(model) > 0
    ours_after, vllm_after = both()
    assert ours_after != ours_before
    assert vllm_after == ours_after


def test_grpo_with_vllm_rollouts_completes_and_tags_the_run(policy_and_engine, vllm_llama_dir: Path, tmp_path: Path):
    """Runs after the parity test: the module's engine is closed first (one in-process engine at a time)."""
    from nemoforge import lineage
    from nemoforge.artifacts import store_for
    from nemoforge.runner.execute import execute_stage

    policy_and_engine[2].close()
    recipe = Recipe(
        name="test",
        rl={
            "steps": 2, "batch_size": 2, "num_generations": 2, "max_new_tokens": 8, "num_prompts": 4,
            "num_heldout_prompts": 2, "warmup_steps": 0, "checkpoint_every_steps": 2, "rollout_engine": "vllm",
            "lr": 1e-3,
        },
        tracking={"mlflow_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
        storage={"artifact_root": str(tmp_path / "artifacts")},
    )  # fmt: skip
    store = store_for(recipe)
    model_uri = store.put(vllm_llama_dir, store.join("models", "sft"))
    data_uri = write_sft_data(recipe, store, store.join("run-1", "sft", "data"))
    lineage.Lineage.for_recipe(recipe).open_pipeline_run("run-1", recipe)
    inputs = {"model": {"uri": model_uri, "digest": "x"}, "data": {"uri": data_uri, "digest": "y"}}
    result, _ = execute_stage("rl", recipe, "run-1", inputs)
    assert result.metrics["train_steps"] == 2
    assert [s for s, _ in result.history["reward_mean"]] == [1, 2]
    assert [s for s, _ in result.history["completion_tokens"]] == [1, 2]
    assert all(0 < v <= 8 for _, v in result.history["completion_tokens"])
    assert result.tags["rollout_engine"] == "vllm"
    (rl,) = [
        s
        for s in lineage.pipeline_status(lineage.Lineage.for_recipe(recipe), "run-1")
        if s["stage"] == "rl"
    ]
    assert rl["state"] == "FINISHED"
    import mlflow

    run = mlflow.MlflowClient(recipe.tracking.mlflow_uri).get_run(rl["run_id"])
    assert run.data.tags["rollout_engine"] == "vllm"
    assert run.data.tags["rollout_engine_version"].startswith("0.")
