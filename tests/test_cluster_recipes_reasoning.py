"""The cluster recipes' reasoning half (sft, rl, eval) carries the paper's settings, data and GPUs, not the CPU demo's."""

from __future__ import annotations

import pytest

from nemoforge.config import Recipe, load_recipe
from nemoforge.errors import RecipeError

CLUSTER = ("llama-3.1-8b", "llama-3.3-70b-super")


@pytest.mark.parametrize("name", CLUSTER)
def test_reasoning_stages_follow_the_paper(name: str):
    r = load_recipe(name)
    demo = Recipe(name="defaults")
    assert {"sft", "rl", "eval"} <= set(r.enabled_stages())
    for uri in (r.data.sft_uri, r.data.math_eval_uri, r.data.ifeval_uri, r.data.preference_uri):
        assert uri is not None and uri.startswith("s3://nemoforge-example/data/"), uri
    # SFT: global batch 256 packed rows of 16K tokens (LN §4)
    assert (r.sft.batch_size, r.sft.seq_len_tokens) == (256, 16384)
    # GRPO: 16 responses per prompt at T 1 / top-p 1; drop prompts with pass rate >= 0.75 from 8 samples (LN §5)
    assert (r.rl.num_generations, r.rl.temperature, r.rl.top_p) == (16, 1.0, 1.0)
    assert (r.rl.filter_samples, r.rl.filter_max_pass_rate) == (8, 0.75)
    assert r.rl.max_new_tokens >= 4096 and r.rl.batch_size >= 64
    # eval: 16 samples at T 0.6 / top-p 0.95, 32K tokens, all of IFEval (LN §7.1)
    e = r.eval
    assert (e.num_samples, e.temperature, e.top_p, e.max_new_tokens) == (16, 0.6, 0.95, 32768)
    assert e.ifeval_num_prompts is None and e.ifeval_reasoning == "off"
    assert e.gate.metric == "math_pass1_on" and e.gate.min_metric > 0.5 and e.gate.min_decode_tokens_per_s > 0
    # none of the demo's CPU sizes is left
    assert r.sft.steps >= 10 * demo.sft.steps and r.rl.steps >= 10 * demo.rl.steps and e.num_problems >= 10 * demo.eval.num_problems
    # GPUs for each stage; rollouts in the vLLM image
    for stage in ("sft", "rl", "eval"):
        res = getattr(r.resources, stage)
        assert res.gpu_count >= 1 and res.node_selector == {"nvidia.com/gpu.product": "NVIDIA-H200"}, stage
    # sft and rl train on whole nodes (torchrun ranks, a TrainJob); rollouts by our decoder on every rank
    for stage in ("sft", "rl"):
        assert (getattr(r.resources, stage).gpu_count, getattr(r.resources, stage).runs_as_trainjob) == (8, True), stage
    assert r.rl.rollout_engine != "vllm"  # vLLM runs in one process, not on torchrun ranks
    assert r.resources.rl.image_set == "rl" and r.rl.preference.enabled


def test_8b_follows_ln_nano_and_70b_ln_super():
    nano, sup = load_recipe("llama-3.1-8b"), load_recipe("llama-3.3-70b-super")
    # Nano stage 1: LR 1e-4 with ~10% warmup, cosine; Super: fixed LR 5e-6 (no warmup, no decay)
    assert nano.sft.lr == 1e-4 and nano.sft.warmup_steps == nano.sft.steps // 10 and nano.sft.min_lr_ratio < 1
    assert (sup.sft.lr, sup.sft.warmup_steps, sup.sft.min_lr_ratio) == (5e-6, 0, 1.0)
    # LN's rollout shape for the 70B is 72 prompts x 16 responses; 72 does not split over 2 x 8 ranks, so 64 x 16
    assert (sup.rl.batch_size, sup.rl.num_generations) == (64, 16)
    # eval gets the GPUs its plan needs: the 70B shards its ~141 GB bf16 parent over 4 (issue 13 §4)
    assert (nano.resources.eval.gpu_count, sup.resources.eval.gpu_count) == (1, 4)  # nemoforge.planning.plan_eval
    assert (nano.resources.sft.num_nodes, sup.resources.sft.num_nodes) == (1, 2)
    # GRPO: the 8B on one 8-GPU node under ZeRO-2 (each rank decodes with the whole policy), the 70B on 2 x 8 under
    # ZeRO-3 (issue 13 §3: the policy update is sharded)
    assert (nano.resources.rl.num_nodes, nano.resources.rl.deepspeed.zero_stage) == (1, 2)
    assert (sup.resources.rl.num_nodes, sup.resources.rl.deepspeed.zero_stage) == (2, 3)


def test_ifeval_fields_validate():
    r = load_recipe("smollm2-135m-demo", ["data.ifeval_uri=../shared/data/ifeval/input_data.jsonl",
                                          "eval.ifeval_num_prompts=8"])
    assert r.data.ifeval_uri.endswith("input_data.jsonl") and r.eval.ifeval_num_prompts == 8
    assert load_recipe("smollm2-135m-demo").data.ifeval_uri is None  # the demo runs no IFEval unless given
    with pytest.raises(RecipeError, match="eval.ifeval_reasoning"):
        load_recipe("smollm2-135m-demo", ["eval.ifeval_reasoning=maybe"])
    with pytest.raises(RecipeError, match="eval.ifeval_num_prompts"):
        load_recipe("smollm2-135m-demo", ["eval.ifeval_num_prompts=0"])
