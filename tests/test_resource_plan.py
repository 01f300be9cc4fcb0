"""Bad resource input fails validation in one line naming the field; eval's GPUs are planned from the model size
(issue 13: "Bad input" and §4)."""

from __future__ import annotations

import pytest
import yaml

from nemoforge.config import ParentArchitecture, builtin_recipes, load_recipe
from nemoforge.config.resources import cpu_only_label
from nemoforge.errors import RecipeError
from nemoforge.planning import GPU_MEMORY_BYTES, num_params, plan_eval, tensor_parallel_sizes
from nemoforge.preflight import check_architecture

LLAMA_70B = ParentArchitecture(  # Llama-3.3-70B-Instruct's config.json
    hidden_size=8192, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
    intermediate_size=28672, vocab_size=128256, tie_word_embeddings=False,
)
SMOLLM2_135M = {  # SmolLM2-135M-Instruct's config.json (the fields the plan reads)
    "hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
    "intermediate_size": 1536, "vocab_size": 49152, "tie_word_embeddings": True, "model_type": "llama",
}


def _invalid(name: str, overrides: list[str]) -> str:
    with pytest.raises(RecipeError) as err:
        load_recipe(name, overrides)
    prefix = f"invalid recipe {name}: "
    assert str(err.value).startswith(prefix) and "\n" not in str(err.value)
    return str(err.value).removeprefix(prefix)


# ------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    ("selector", "label"),
    [
        ("{nemoforge.io/pool: system}", "nemoforge.io/pool=system"),
        ("{nvidia.com/gpu.present: 'false'}", "nvidia.com/gpu.present=false"),
        ("{nvidia.com/gpu.count: '0'}", "nvidia.com/gpu.count=0"),
    ],
)
def test_gpus_on_a_cpu_only_node_name_the_node_selector(selector: str, label: str):
    assert _invalid("llama-3.1-8b", [f"resources.nas.node_selector={selector}"]) == (
        f"resources.nas.node_selector {label} picks CPU-only nodes but resources.nas.gpu_count=1: select a GPU pool "
        "(nvidia.com/gpu.product: NVIDIA-H200) or set gpu_count=0"
    )


def test_cpu_only_label_reads_gpu_pools_as_gpu_nodes():
    assert cpu_only_label({"nemoforge.io/pool": "gpu-h200", "nvidia.com/gpu.present": "true"}) is None
    assert cpu_only_label({"nvidia.com/gpu.product": "NVIDIA-H200"}) is None
    assert cpu_only_label({}) is None
    # a CPU step on the CPU pool is fine
    assert load_recipe("llama-3.1-8b", ["resources.corpus.node_selector={nemoforge.io/pool: system}"])


def test_a_serve_tensor_parallel_size_that_does_not_divide_its_gpus_names_the_field():
    assert _invalid("llama-3.1-8b", ["serve.tensor_parallel_size=4", "resources.serve.gpu_count=2"]) == (
        "serve.tensor_parallel_size=4 does not divide resources.serve.gpu_count=2: vLLM needs one GPU per rank; "
        "set serve.tensor_parallel_size=2 or gpu_count=4"
    )


def test_a_serve_tensor_parallel_size_that_does_not_divide_the_heads_names_the_field():
    assert _invalid("llama-3.1-8b", ["serve.tensor_parallel_size=3", "resources.serve.gpu_count=3"]) == (
        "serve.tensor_parallel_size=3: a tensor-parallel size must divide the attention and KV head counts "
        "(32 and 8, model.parent.architecture); use one of 1, 2, 4, 8"
    )


def test_eval_gpus_that_do_not_divide_the_heads_name_the_field():
    assert _invalid("llama-3.3-70b-super", ["resources.eval.gpu_count=6"]) == (
        "resources.eval.gpu_count=6: a tensor-parallel size must divide the attention and KV head counts "
        "(64 and 8, model.parent.architecture); use one of 1, 2, 4, 8"
    )


def test_the_preflight_checks_the_heads_of_a_parent_whose_shape_the_recipe_does_not_state():
    one_pod = "resources.eval.launch=task"
    recipe = load_recipe("smollm2-135m-demo", ["resources.eval.gpu_count=2", one_pod])  # no shape stated
    with pytest.raises(RecipeError) as err:
        check_architecture(recipe, SMOLLM2_135M)
    assert str(err.value) == (
        "resources.eval.gpu_count=2: a tensor-parallel size must divide the attention and KV head counts "
        "(9 and 3, the parent's config.json); use one of 1, 3"
    )
    check_architecture(load_recipe("smollm2-135m-demo", ["resources.eval.gpu_count=3", one_pod]), SMOLLM2_135M)


def test_the_preflight_refuses_a_stated_shape_the_checkpoint_does_not_have():
    recipe = load_recipe("smollm2-135m-gpu")
    check_architecture(recipe, SMOLLM2_135M)
    with pytest.raises(RecipeError) as err:
        check_architecture(recipe, SMOLLM2_135M | {"num_key_value_heads": 9})
    assert str(err.value) == (
        "model.parent.architecture.num_key_value_heads=3 but the parent's config.json says 9: fix it, or remove "
        "model.parent.architecture"
    )


# ------------------------------------------------------------------------------------------- eval's GPU plan
def test_parameter_counts_of_the_shipped_parents():
    assert num_params(LLAMA_70B) == 70_553_706_496  # Llama-3.3-70B: 70.6B
    assert num_params(load_recipe("llama-3.1-8b").model.parent.architecture) == 8_030_261_248  # Llama-3.1-8B
    assert num_params(ParentArchitecture(**{k: v for k, v in SMOLLM2_135M.items() if k != "model_type"})) == (
        134_515_008  # SmolLM2-135M
    )
    assert tensor_parallel_sizes(LLAMA_70B) == [1, 2, 4, 8]


def test_the_70b_eval_plan_is_four_h200s():
    recipe = load_recipe("llama-3.3-70b-super")
    plan = plan_eval(recipe, LLAMA_70B, GPU_MEMORY_BYTES["NVIDIA-H200"])
    assert plan.weight_bytes == 70_553_706_496 * 2  # bf16
    assert plan.kv_cache_bytes == 2 * 80 * 8 * 128 * 2 * 8 * (8192 + 32768) == 107_374_182_400
    assert plan.logits_bytes == 8 * 8192 * 128256 * 4 == 33_621_540_864
    assert plan.total_bytes / (0.9 * plan.gpu_memory_bytes) == pytest.approx(2.08, abs=0.005)  # rounds up to 4
    assert plan.num_gpus == 4 == recipe.resources.eval.gpu_count
    assert plan_eval(recipe, LLAMA_70B, GPU_MEMORY_BYTES["NVIDIA-H100-80GB-HBM3"]).num_gpus == 4  # 3.67 -> 4


def test_eval_gpus_below_the_plan_fail_naming_the_needed_number():
    assert _invalid("llama-3.3-70b-super", ["resources.eval.gpu_count=2"]) == (
        "resources.eval.gpu_count=2 is below the 4 GPUs eval needs (70.55B params = 141.1 GB weights + 107.4 GB KV "
        "cache + 33.6 GB logits = 282.1 GB over 90% of 150.8 GB per GPU, model.parent.architecture); set "
        "resources.eval.gpu_count=4"
    )
    # the 8B fits one H200 (127.0 GB) but not one H100 (77.0 GB usable): 2 of them
    h100 = "{nvidia.com/gpu.product: NVIDIA-H100-80GB-HBM3}"
    assert _invalid("llama-3.1-8b", [f"resources.eval.node_selector={h100}"]).startswith(
        "resources.eval.gpu_count=1 is below the 2 GPUs eval needs (8.03B params = 16.1 GB weights + 77.3 GB KV "
        "cache + 33.6 GB logits = 127.0 GB over 90% of 85.5 GB per GPU"
    )
    fixed = [f"resources.eval.node_selector={h100}", "resources.eval.gpu_count=2"]
    assert _invalid("llama-3.1-8b", fixed) == (
        "resources.eval.launch=auto: eval runs in one pod on its 2 GPUs, which auto launches as a TrainJob; set task"
    )
    assert load_recipe("llama-3.1-8b", [*fixed, "resources.eval.launch=task"])


def test_an_eval_that_fits_no_tensor_parallel_size_says_what_to_lower():
    assert _invalid("llama-3.3-70b-super", ["eval.batch_size=256"]).endswith(
        "; lower eval.batch_size or eval.max_new_tokens"
    )


def test_shipped_recipes_validate_and_show_prints_their_eval_plan(capsys):
    from nemoforge_cli.main import main

    plans = {}
    for name in builtin_recipes():
        recipe = load_recipe(name)
        arch = recipe.model.parent.architecture
        plan = recipe.eval_plan(arch) if arch else None
        plans[name] = (recipe.resources.eval.gpu_count, plan and plan.num_gpus)
    assert plans == {
        "llama-3.1-8b": (1, 1),
        "llama-3.3-70b-super": (4, 4),
        "smollm2-135m-demo": (0, None),  # eval on the CPU
        "smollm2-135m-gpu": (1, 1),
    }
    assert main(["show", "llama-3.3-70b-super"]) == 0
    out = capsys.readouterr().out
    assert yaml.safe_load(out)["resources"]["eval"]["gpu_count"] == 4  # the plan line is a YAML comment
    assert out.splitlines()[-1] == (
        "# eval plan (nemoforge.planning.plan_eval): 4 GPUs: 70.55B params = 141.1 GB weights + 107.4 GB KV cache "
        "+ 33.6 GB logits = 282.1 GB over 90% of 150.8 GB per GPU"
    )
