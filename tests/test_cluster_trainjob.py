"""The TrainJob built from a recipe: valid against the real Trainer CRD, with the recipe's resources and ZeRO."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import jsonschema
import pytest

from nemoforge.cluster.trainjob import PATCH_MANAGER, build_trainjob, trainjob_name
from nemoforge.config import load_recipe
from nemoforge.errors import RecipeError
from nemoforge.training.deepspeed_config import deepspeed_config

REPO = Path(__file__).resolve().parents[1]
INPUTS = {
    "parent": {"uri": "s3://b/models/parent-1", "digest": "p" * 64},
    "model": {"uri": "s3://b/run/nas/model", "digest": "m" * 64, "params": "6.1e9"},
    "corpus": {"uri": "s3://b/corpus/abc", "digest": "c" * 64},
}


@pytest.fixture(scope="module")
def trainjob_validator(shared_dir: Path) -> jsonschema.Draft7Validator:
    """The CRD's schema made strict (unknown fields rejected) by the chart's validator, charts/validate.py."""
    spec = importlib.util.spec_from_file_location("nemoforge_chart_validate", REPO / "charts" / "validate.py")
    chart_validate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(chart_validate)
    schemas = chart_validate.load_crd(shared_dir / "schemas/crds/trainer.kubeflow.org_trainjobs.yaml")
    return jsonschema.Draft7Validator(schemas[("trainer.kubeflow.org/v1alpha1", "TrainJob")])


def check_trainjob(job: dict, validator: jsonschema.Draft7Validator) -> None:
    """Schema (strict) plus the CRD's CEL rules on the name, which plain JSON Schema does not run."""
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(job)]
    assert not errors, errors
    name = job["metadata"]["name"]
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= 63, name
    for value in job["metadata"]["labels"].values():
        assert re.fullmatch(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]", value) and len(value) <= 63


def test_70b_distill_trainjob_matches_recipe_and_crd(trainjob_validator):
    recipe = load_recipe("llama-3.3-70b-super", ["resources.image_pull_secrets=[ghcr-pull]"])
    job = build_trainjob(
        recipe, "distill", "nemoforge-llama-3-3-70b-super-9xk2p", INPUTS,
        image="ghcr.io/nemoforge/train:0.1.0", namespace="team-a", owner={"name": "launcher-pod", "uid": "u-1"},
    )
    check_trainjob(job, trainjob_validator)
    spec = job["spec"]
    assert spec["runtimeRef"] == {"apiGroup": "trainer.kubeflow.org", "kind": "ClusterTrainingRuntime",
                                  "name": "torch-distributed"}
    trainer = spec["trainer"]
    assert trainer["numNodes"] == 2 and trainer["numProcPerNode"] == 8
    assert trainer["resourcesPerNode"] == {
        "requests": {"cpu": "160", "memory": "1800Gi", "nvidia.com/gpu": "8"},
        "limits": {"cpu": "160", "memory": "1800Gi", "nvidia.com/gpu": "8"},
    }
    assert trainer["image"] == "ghcr.io/nemoforge/train:0.1.0"
    assert trainer["command"] == ["torchrun", "--module", "nemoforge.cluster.worker"]
    assert trainer["args"] == ["--stage", "distill", "--run-name", "nemoforge-llama-3-3-70b-super-9xk2p"]
    env = {e["name"]: e["value"] for e in trainer["env"]}
    assert json.loads(env["NEMOFORGE_INPUTS_JSON"]) == INPUTS
    assert json.loads(env["NEMOFORGE_RECIPE_JSON"])["resources"]["distill"]["num_nodes"] == 2
    ds = json.loads(env["NEMOFORGE_DEEPSPEED_CONFIG"])
    assert ds["zero_optimization"]["stage"] == 3 and ds["bf16"] == {"enabled": True}
    assert (ds["train_batch_size"], ds["gradient_accumulation_steps"], ds["train_micro_batch_size_per_gpu"]) == (128, 4, 2)
    assert spec["activeDeadlineSeconds"] == 1209600
    assert "podTemplateOverrides" not in spec
    (patch,) = spec["runtimePatches"]
    assert patch["manager"] == PATCH_MANAGER
    (rjob,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    assert rjob["name"] == "node"
    pod = rjob["template"]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "nemoforge"
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H200"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Equal", "value": "present", "effect": "NoSchedule"}]
    assert pod["imagePullSecrets"] == [{"name": "ghcr-pull"}]
    assert pod["volumes"] == [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "64Gi"}}]
    assert pod["containers"] == [{"name": "node", "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}]}]
    assert job["metadata"]["ownerReferences"] == [
        {"apiVersion": "v1", "kind": "Pod", "name": "launcher-pod", "uid": "u-1", "blockOwnerDeletion": False}
    ]


def test_8b_single_node_trainjob_zero2(trainjob_validator):
    recipe = load_recipe("llama-3.1-8b")
    job = build_trainjob(recipe, "cpt", "r1", {"model": INPUTS["model"], "corpus": INPUTS["corpus"]},
                         image="img:1", namespace="ns")
    check_trainjob(job, trainjob_validator)
    assert (job["spec"]["trainer"]["numNodes"], job["spec"]["trainer"]["numProcPerNode"]) == (1, 8)
    ds = json.loads({e["name"]: e["value"] for e in job["spec"]["trainer"]["env"]}["NEMOFORGE_DEEPSPEED_CONFIG"])
    assert ds["zero_optimization"] == {"stage": 2, "overlap_comm": True, "contiguous_gradients": True,
                                       "reduce_scatter": True, "reduce_bucket_size": 500_000_000}
    # no optimizer/scheduler sections: the loop hands DeepSpeed its AdamW and schedule, read from the recipe
    assert "optimizer" not in ds and "scheduler" not in ds
    cpt = json.loads({e["name"]: e["value"] for e in job["spec"]["trainer"]["env"]}["NEMOFORGE_RECIPE_JSON"])["cpt"]
    assert (cpt["steps"], cpt["warmup_steps"], cpt["min_lr_ratio"]) == (500, 25, 0.1)
    assert (cpt["lr"], cpt["weight_decay"]) == (2e-5, 0.0)
    assert ds == deepspeed_config(recipe.cpt, recipe.resources.cpt)  # built in one place: training/
    assert "ownerReferences" not in job["metadata"]


@pytest.mark.parametrize(("name", "num_nodes", "zero_stage", "accumulation"),
                         [("llama-3.1-8b", 1, 2, 32), ("llama-3.3-70b-super", 2, 3, 16)])
def test_sft_trainjob_spans_the_recipes_gpus(trainjob_validator, name, num_nodes, zero_stage, accumulation):
    recipe = load_recipe(name)
    job = build_trainjob(recipe, "sft", "r1", {"model": INPUTS["model"]}, image="img:1", namespace="ns")
    check_trainjob(job, trainjob_validator)
    trainer = job["spec"]["trainer"]
    assert (trainer["numNodes"], trainer["numProcPerNode"]) == (num_nodes, 8)
    assert trainer["args"] == ["--stage", "sft", "--run-name", "r1"]
    ds = json.loads({e["name"]: e["value"] for e in trainer["env"]}["NEMOFORGE_DEEPSPEED_CONFIG"])
    # LN's global batch of 256 chats, one 16K-token row per GPU per micro-batch
    assert (ds["train_batch_size"], ds["gradient_accumulation_steps"], ds["train_micro_batch_size_per_gpu"]) == (
        256, accumulation, 1)
    assert ds["zero_optimization"]["stage"] == zero_stage


@pytest.mark.parametrize(("name", "num_nodes", "zero_stage", "accumulation"),
                         [("llama-3.1-8b", 1, 2, 8), ("llama-3.3-70b-super", 2, 3, 4)])
def test_rl_trainjob_spans_the_recipes_gpus(trainjob_validator, name, num_nodes, zero_stage, accumulation):
    """GRPO across GPUs (issue 13 §3): the worker runs ``--stage rl`` on every GPU with sft's model and data split."""
    recipe = load_recipe(name)
    inputs = {"model": INPUTS["model"], "data": {"uri": "s3://b/run/sft/data", "digest": "s" * 64}}
    job = build_trainjob(recipe, "rl", "r1", inputs, image="ghcr.io/nemoforge/rl:0.1.0", namespace="ns")
    check_trainjob(job, trainjob_validator)
    assert job["metadata"]["labels"]["nemoforge.io/stage"] == "rl"
    trainer = job["spec"]["trainer"]
    assert (trainer["numNodes"], trainer["numProcPerNode"]) == (num_nodes, 8)
    assert trainer["resourcesPerNode"] == {
        "requests": {"cpu": "160", "memory": "1800Gi", "nvidia.com/gpu": "8"},
        "limits": {"cpu": "160", "memory": "1800Gi", "nvidia.com/gpu": "8"},
    }
    assert trainer["image"] == "ghcr.io/nemoforge/rl:0.1.0"
    assert trainer["command"] == ["torchrun", "--module", "nemoforge.cluster.worker"]
    assert trainer["args"] == ["--stage", "rl", "--run-name", "r1"]
    env = {e["name"]: e["value"] for e in trainer["env"]}
    assert json.loads(env["NEMOFORGE_INPUTS_JSON"]) == inputs
    assert json.loads(env["NEMOFORGE_RECIPE_JSON"])["rl"]["rollout_engine"] == "generate"  # vLLM: one process only
    ds = json.loads(env["NEMOFORGE_DEEPSPEED_CONFIG"])
    # 64 prompts (x 16 responses) per GRPO step: one prompt group per rank per micro-batch
    assert (ds["train_batch_size"], ds["gradient_accumulation_steps"], ds["train_micro_batch_size_per_gpu"]) == (
        64, accumulation, 1)
    assert ds["zero_optimization"]["stage"] == zero_stage
    assert ds == deepspeed_config(recipe.rl, recipe.resources.rl)
    (patch,) = job["spec"]["runtimePatches"]
    pod = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H200"} and pod["serviceAccountName"] == "nemoforge"
    assert pod["volumes"] == [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "64Gi"}}]


def test_the_schema_check_is_strict(trainjob_validator):
    recipe = load_recipe("llama-3.1-8b")
    job = build_trainjob(recipe, "cpt", "r1", {}, image="img:1", namespace="ns")
    job["spec"]["podTemplateOverrides"] = [{"targetJobs": [{"name": "node"}]}]  # removed in Trainer 2.2
    with pytest.raises(AssertionError, match="podTemplateOverrides"):
        check_trainjob(job, trainjob_validator)
    job = build_trainjob(recipe, "cpt", "r1", {}, image="img:1", namespace="ns")
    job["spec"]["trainer"]["numNodes"] = "two"
    with pytest.raises(AssertionError, match="numNodes"):
        check_trainjob(job, trainjob_validator)


def test_batch_that_does_not_split_names_the_fix():
    # at validation, before any compute (issue 12 §6: cross-field rules live in validators)
    with pytest.raises(RecipeError, match=r"distill.batch_size=100 does not split over 16 ranks x 4 .* multiple of 64 "
                                          r"\(e\.g\. 128\) \(resources.distill: 2 nodes x 8 GPUs"):
        load_recipe("llama-3.3-70b-super", ["distill.batch_size=100"])
    recipe = load_recipe("llama-3.3-70b-super")
    bad = recipe.distill.model_copy(update={"batch_size": 100})  # a config that skipped validation
    with pytest.raises(RecipeError, match=r"batch_size=100 does not split over 16 ranks x 4 .* multiple of 64 \(e\.g\. 128\)"):
        deepspeed_config(bad, recipe.resources.distill)


def test_nas_never_runs_as_trainjob():
    with pytest.raises(RecipeError, match="nas runs in one pod"):
        load_recipe("llama-3.1-8b", ["resources.nas.num_nodes=2"])
    with pytest.raises(RecipeError, match="only distill, cpt, sft, rl run as TrainJobs, not nas"):
        build_trainjob(load_recipe("llama-3.1-8b"), "nas", "r1", {}, image="img:1", namespace="ns")
    with pytest.raises(RecipeError, match="set resources.image_set=train"):
        load_recipe("smollm2-135m-demo", ["resources.distill.num_nodes=2"])


def test_names_are_dns_labels_unique_per_run_and_stage():
    names = {trainjob_name(run, stage) for run in ("Run_1", "run-1", "9" * 80) for stage in ("distill", "cpt")}
    assert len(names) == 6
    assert all(re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", n) and len(n) <= 40 for n in names)
    assert trainjob_name("nemoforge-llama-3-1-8b-x7k2p", "distill") == "nemoforge-llama-3-1-8b-distill-1a4daa37"
