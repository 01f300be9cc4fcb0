"""The compiled pipeline of every built-in recipe is checked in, fresh, and carries the recipe's cluster settings."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from nemoforge.config import Recipe, StageResources, builtin_recipes, load_recipe
from nemoforge_components.images import image_ref, load_images
from nemoforge_pipelines import compile_recipe

COMPILED = Path(__file__).resolve().parents[1] / "pipelines" / "compiled"
REFRESH = "bash pipelines/compiled/refresh.sh"
LIGHT = {"check-inputs": ("1", "4Gi"), "parent": ("1", "4Gi"), "finalize": ("1", "4Gi"), "distill-trainjob": ("1", "2Gi"),
         "cpt-trainjob": ("1", "2Gi"), "sft-trainjob": ("1", "2Gi"), "rl-trainjob": ("1", "2Gi")}


def _normalized(text: str) -> str:
    """The YAML without the SDK's patch version (kfp==2.17.* may resolve to another patch on a fresh machine)."""
    return "\n".join(line for line in text.splitlines() if not line.startswith("sdkVersion:"))


@pytest.mark.parametrize("name", builtin_recipes())
def test_checked_in_yaml_is_fresh(name: str, tmp_path: Path):
    checked_in = COMPILED / f"{name}.yaml"
    assert checked_in.is_file(), f"{checked_in} is missing: run `{REFRESH}`"
    fresh = compile_recipe(load_recipe(name), tmp_path / f"{name}.yaml").read_text()
    assert _normalized(fresh) == _normalized(checked_in.read_text()), f"{checked_in} is stale: run `{REFRESH}`"


def tasks_of(ir: dict) -> dict[str, dict]:
    """Every container task of the pipeline (root DAG, the exit handler's, the condition's) by task name."""
    tasks, dags = {}, [ir["root"]["dag"]]
    while dags:
        for name, task in dags.pop()["tasks"].items():
            dag = ir["components"][task["componentRef"]["name"]].get("dag")
            if dag:
                dags.append(dag)
            else:
                tasks[name] = task
    return tasks


def expected_resources(recipe: Recipe, task: str) -> StageResources:
    """What the recipe says a task requests (the rule of nemoforge_pipelines.build_pipeline)."""
    res = recipe.resources
    if task in LIGHT:
        cpu, memory = LIGHT[task]
        stage = task.removesuffix("-trainjob")
        stage_res = getattr(res, stage) if task.endswith("-trainjob") else StageResources()
        # a launcher runs in its stage's image (rl's: vLLM beside the policy), small, retried as its stage
        return StageResources(cpu=cpu, memory=memory, image_set=stage_res.image_set, retries=stage_res.retries,
                              retry_backoff_s=stage_res.retry_backoff_s)
    return getattr(res, task)


@pytest.mark.parametrize("name", builtin_recipes())
def test_every_task_requests_what_the_recipe_says(name: str):
    recipe = load_recipe(name)
    ir, *platform = yaml.safe_load_all((COMPILED / f"{name}.yaml").read_text())  # no platform spec: no k8s settings
    executors = ir["deploymentSpec"]["executors"]
    kube = platform[0]["platforms"]["kubernetes"]["deploymentSpec"]["executors"] if platform else {}
    tasks = tasks_of(ir)
    stages = {t.removesuffix("-trainjob") for t in tasks}
    assert stages == {"check-inputs", "parent", "corpus", "finalize", *recipe.enabled_stages()}
    for task_name, task in tasks.items():
        exec_name = ir["components"][task["componentRef"]["name"]]["executorLabel"]
        container, k8s = executors[exec_name]["container"], kube.get(exec_name, {})
        res = expected_resources(recipe, task_name)
        where = f"{name}: task {task_name}"
        assert task_name.endswith("-trainjob") == getattr(recipe.resources, task_name.removesuffix("-trainjob"),
                                                          StageResources()).runs_as_trainjob, where
        got = container["resources"]
        assert (got["resourceCpuRequest"], got["resourceCpuLimit"]) == (res.cpu, res.cpu), where
        assert (got["resourceMemoryRequest"], got["resourceMemoryLimit"]) == (res.memory, res.memory), where
        if res.gpu_count:
            assert got["accelerator"]["resourceType"] == res.accelerator_type, where
            assert got["accelerator"]["resourceCount"] == str(res.gpu_count), where
        else:
            assert "accelerator" not in got, where
        assert k8s.get("nodeSelector", {}).get("labels", {}) == res.node_selector, where
        assert k8s.get("tolerations", []) == [t.model_dump(exclude_none=True) for t in res.tolerations], where
        assert [s["secretName"] for s in k8s.get("imagePullSecret", [])] == recipe.resources.image_pull_secrets, where
        shm = [m for m in k8s.get("emptyDirMounts", []) if m["mountPath"] == "/dev/shm"]
        assert shm == ([{"medium": "Memory", "mountPath": "/dev/shm", "sizeLimit": f"{res.shm_gib}Gi",
                         "volumeName": "dshm"}] if res.shm_gib else []), where
        assert task.get("retryPolicy", {}).get("maxRetryCount", 0) == res.retries, where
        assert not task.get("cachingOptions", {}).get("enableCache", False), where
        image_set = res.image_set or recipe.resources.image_set
        assert container["image"] == (image_ref(image_set) if image_set else recipe.resources.base_image), where
        if task_name.endswith("-trainjob"):
            stage_res = getattr(recipe.resources, task_name.removesuffix("-trainjob"))
            assert task["inputs"]["parameters"]["image"]["runtimeValue"]["constant"] == container["image"], where
            assert stage_res.num_nodes * stage_res.gpu_count > 1, where
            assert {e["name"] for e in k8s["fieldPathAsEnv"]} == {
                "NEMOFORGE_NAMESPACE", "NEMOFORGE_POD_NAME", "NEMOFORGE_POD_UID"}, where


def test_cluster_recipes_launch_training_as_trainjobs_and_pin_images():
    pinned = {s["image"] for s in load_images()["sets"].values()}
    for name in ("llama-3.1-8b", "llama-3.3-70b-super"):
        ir = next(yaml.safe_load_all((COMPILED / f"{name}.yaml").read_text()))
        tasks = tasks_of(ir)
        assert {"distill-trainjob", "cpt-trainjob", "sft-trainjob", "rl-trainjob", "nas", "eval"} <= set(tasks), name
        # rl's launcher reads sft's model and data split, as the rl task does
        rl_inputs = tasks["rl-trainjob"]["inputs"]["artifacts"]
        assert {k: v["taskOutputArtifact"] for k, v in rl_inputs.items()} == {
            "input_model": {"outputArtifactKey": "model", "producerTask": "sft-trainjob"},
            "sft_data": {"outputArtifactKey": "data", "producerTask": "sft-trainjob"}}, name
        images = {e["container"]["image"] for e in ir["deploymentSpec"]["executors"].values()}
        assert images <= pinned, images - pinned
        recipe = load_recipe(name)
        assert recipe.model.parent.path.startswith("s3://") and recipe.data.corpus_uri.startswith("s3://")
        assert recipe.storage.artifact_root.startswith("s3://")


@pytest.mark.parametrize("name", builtin_recipes())
def test_corpus_is_cpu_and_everything_after_check_inputs_is_conditional(name: str):
    ir = next(yaml.safe_load_all((COMPILED / f"{name}.yaml").read_text()))
    tasks = tasks_of(ir)
    corpus = ir["deploymentSpec"]["executors"][ir["components"][tasks["corpus"]["componentRef"]["name"]]["executorLabel"]]
    assert "accelerator" not in corpus["container"]["resources"], name  # tokenizing needs no GPU
    exit_dag = ir["components"][ir["root"]["dag"]["tasks"]["exit-handler-1"]["componentRef"]["name"]]["dag"]["tasks"]
    (cond_name,) = set(exit_dag) - {"check-inputs"}
    cond = exit_dag[cond_name]
    assert cond["dependentTasks"] == ["check-inputs"]
    assert cond["triggerPolicy"]["condition"] == "inputs.parameter_values['pipelinechannel--check-inputs-Output'] == 'run'"
    gated = set(ir["components"][cond["componentRef"]["name"]]["dag"]["tasks"])
    assert gated == set(tasks) - {"check-inputs", "finalize"}, name
    assert ir["root"]["inputDefinitions"]["parameters"]["force"] == {
        "defaultValue": False, "isOptional": True, "parameterType": "BOOLEAN"}


def test_compile_warns_when_a_task_image_holds_no_nemoforge(tmp_path: Path, capsys):
    from nemoforge_cli.main import main
    from nemoforge_pipelines import unpinned_images

    assert main(["compile", "smollm2-135m-demo", "-o", str(tmp_path / "demo.yaml")]) == 0
    err = capsys.readouterr().err
    assert "warning: tasks check-inputs, corpus, cpt, distill, eval, finalize, nas, parent, rl, sft run in " \
        "python:3.11-slim, not a pinned nemoforge image" in err and "--set resources.image_set=train" in err
    assert main(["compile", "smollm2-135m-demo", "-o", str(tmp_path / "pinned.yaml"),
                 "--set", "resources.image_set=train"]) == 0
    assert "warning" not in capsys.readouterr().err
    assert unpinned_images(tmp_path / "pinned.yaml") == {}
    assert unpinned_images(COMPILED / "llama-3.1-8b.yaml") == {}
