"""Build one KFP v2 pipeline from a recipe: one task per enabled stage, resources from the recipe.

The recipe travels whole as the ``recipe_json`` pipeline parameter (editable in the Kubeflow UI); the
run name is KFP's job name, which is also the MLflow parent run's name and the artifact prefix.
KFP caching is off on every task: steps skip themselves by a key of their recipe section and input
digests (``nemoforge.runner``), which also works for launcher tasks whose inputs never change.

The first task, ``check-inputs``, compares the input digests with the registered champion's lineage: when
nothing changed (and the ``force`` parameter is false) it records the run as skipped and every other task
but ``finalize`` stays out (``dsl.If``), so a scheduled retraining costs one small pod.
"""


# No `from __future__ import annotations` here: KFP reads the parameter types at definition time.
from collections.abc import Callable
from pathlib import Path

import yaml
from kfp import compiler, dsl, kubernetes

from nemoforge.config import Recipe, ResourcesConfig, StageResources
from nemoforge_components import make_components
from nemoforge_components.images import image_ref, load_images


def _image(res: StageResources, cluster: ResourcesConfig) -> str:
    """The stage's pinned image (components/images/images.yaml), else the recipe's base_image."""
    image_set = res.image_set or cluster.image_set
    return image_ref(image_set) if image_set else cluster.base_image


def _apply_resources(task: dsl.PipelineTask, res: StageResources, cluster: ResourcesConfig) -> dsl.PipelineTask:
    task.set_caching_options(enable_caching=False)
    if res.image_set or cluster.image_set:
        task.set_container_image(_image(res, cluster))
    if cluster.image_pull_secrets:
        kubernetes.set_image_pull_secrets(task, list(cluster.image_pull_secrets))
    if res.retries:
        task.set_retry(num_retries=res.retries, backoff_duration=f"{res.retry_backoff_s}s", backoff_factor=2.0)
    if res.shm_gib:
        kubernetes.empty_dir_mount(task, "dshm", "/dev/shm", medium="Memory", size_limit=f"{res.shm_gib}Gi")
    quantities = res.quantities()
    cpu, memory = quantities.pop("cpu"), quantities.pop("memory")
    task.set_cpu_request(cpu).set_cpu_limit(cpu)
    task.set_memory_request(memory).set_memory_limit(memory)
    for accelerator, count in quantities.items():  # the stage's GPUs, when it has any
        task.set_accelerator_type(accelerator).set_accelerator_limit(count)
    for label, value in res.node_selector.items():
        kubernetes.add_node_selector(task, label_key=label, label_value=value)
    for tol in res.tolerations:
        kubernetes.add_toleration(task, key=tol.key, operator=tol.operator, value=tol.value, effect=tol.effect)
    return task


def _apply_launcher(task: dsl.PipelineTask, res: StageResources, cluster: ResourcesConfig) -> dsl.PipelineTask:
    """A task that launches a TrainJob: a small CPU pod of the stage's image that knows who it is.

    The stage's GPUs, node selector and tolerations go to the TrainJob's pods, not to this one.
    """
    small = StageResources(
        cpu="1", memory="2Gi", image_set=res.image_set, retries=res.retries, retry_backoff_s=res.retry_backoff_s
    )
    _apply_resources(task, small, cluster)
    for env, field in (
        ("NEMOFORGE_NAMESPACE", "metadata.namespace"),
        ("NEMOFORGE_POD_NAME", "metadata.name"),
        ("NEMOFORGE_POD_UID", "metadata.uid"),
    ):
        kubernetes.use_field_path_as_env(task, env, field)
    return task


def build_pipeline(recipe: Recipe) -> Callable:
    """The ``@dsl.pipeline`` function of ``recipe`` (disabled stages left out).

    The model flows parent -> nas -> distill -> cpt -> sft -> rl, each stage taking the newest model; distill
    also takes the parent as its teacher, and eval takes the newest model, the parent and the corpus (its
    held-out rows). sft hands its data split to rl and eval (the ``data`` output: the prompts rl keeps apart, the
    held-out problems eval grades).
    """
    ops = make_components(recipe.resources.base_image)
    cluster = recipe.resources
    light = StageResources(cpu="1", memory="4Gi")

    @dsl.pipeline(name=f"nemoforge-{recipe.name}", description=recipe.description or recipe.name)
    def pipeline(recipe_json: str = recipe.to_json(), force: bool = False):
        run_name = dsl.PIPELINE_JOB_NAME_PLACEHOLDER
        exit_task = ops["finalize"](recipe_json=recipe_json, run_name=run_name)
        _apply_resources(exit_task, light, cluster).set_display_name("finalize")
        with dsl.ExitHandler(exit_task, name="recipe"):
            check = ops["check_inputs"](recipe_json=recipe_json, run_name=run_name, force=force)
            _apply_resources(check, light, cluster)
            with dsl.If(check.output == "run", name="inputs-changed"):
                _stage_tasks(ops, recipe, recipe_json, run_name, light)

    return pipeline


def _stage_tasks(ops: dict[str, Callable], recipe: Recipe, recipe_json: str, run_name: str, light: StageResources) -> None:
    """Add the parent, corpus and stage tasks to the pipeline being built (inside its ``dsl.If``).

    ``recipe_json`` and ``run_name`` are the pipeline's channels (typed ``str`` for KFP's sake).
    """
    stages = recipe.enabled_stages()
    cluster = recipe.resources
    parent = _apply_resources(ops["parent"](recipe_json=recipe_json, run_name=run_name), light, cluster)
    parent_model = parent.outputs["parent_model"]
    corpus_task = ops["corpus"](recipe_json=recipe_json, run_name=run_name, parent_model=parent_model)
    corpus = _apply_resources(corpus_task, cluster.corpus, cluster).outputs["corpus"]
    model = parent_model
    if "nas" in stages:
        task = ops["nas"](recipe_json=recipe_json, run_name=run_name, parent_model=parent_model, corpus=corpus)
        model = _apply_resources(task, cluster.nas, cluster).outputs["model"]
    if "distill" in stages:
        inputs = {"parent_model": parent_model, "student_model": model, "corpus": corpus}
        if cluster.distill.runs_as_trainjob:
            image = _image(cluster.distill, cluster)
            task = ops["distill_trainjob"](recipe_json=recipe_json, run_name=run_name, image=image, **inputs)
            _apply_launcher(task, cluster.distill, cluster).set_display_name("distill")
        else:
            task = _apply_resources(
                ops["distill"](recipe_json=recipe_json, run_name=run_name, **inputs), cluster.distill, cluster
            )
        model = task.outputs["model"]
    if "cpt" in stages:
        inputs = {"input_model": model, "corpus": corpus}
        if cluster.cpt.runs_as_trainjob:
            image = _image(cluster.cpt, cluster)
            task = ops["cpt_trainjob"](recipe_json=recipe_json, run_name=run_name, image=image, **inputs)
            _apply_launcher(task, cluster.cpt, cluster).set_display_name("cpt")
        else:
            task = _apply_resources(ops["cpt"](recipe_json=recipe_json, run_name=run_name, **inputs), cluster.cpt, cluster)
        model = task.outputs["model"]
    # the reasoning half: sft and rl take the newest model, eval takes rl's (or the newest), the parent and the
    # corpus; rl and eval read sft's data split (the recipe's validation requires sft for rl, and for eval without
    # data.math_eval_uri)
    sft_data = {}
    if "sft" in stages:
        if cluster.sft.runs_as_trainjob:
            image = _image(cluster.sft, cluster)
            task = ops["sft_trainjob"](recipe_json=recipe_json, run_name=run_name, image=image, input_model=model)
            _apply_launcher(task, cluster.sft, cluster).set_display_name("sft")
        else:
            task = _apply_resources(
                ops["sft"](recipe_json=recipe_json, run_name=run_name, input_model=model), cluster.sft, cluster
            )
        model, sft_data = task.outputs["model"], {"sft_data": task.outputs["data"]}
    if "rl" in stages:
        if cluster.rl.runs_as_trainjob:
            image = _image(cluster.rl, cluster)
            task = ops["rl_trainjob"](recipe_json=recipe_json, run_name=run_name, image=image, input_model=model,
                                      **sft_data)
            _apply_launcher(task, cluster.rl, cluster).set_display_name("rl")
        else:
            task = _apply_resources(
                ops["rl"](recipe_json=recipe_json, run_name=run_name, input_model=model, **sft_data), cluster.rl, cluster
            )
        model = task.outputs["model"]
    if "eval" in stages:
        task = ops["eval"](
            recipe_json=recipe_json, run_name=run_name, input_model=model, parent_model=parent_model, corpus=corpus,
            **sft_data,
        )
        _apply_resources(task, cluster.eval, cluster)
    # serve stays last: it serves whatever model the stages above produced.
    if "serve" in stages:
        task = ops["serve"](recipe_json=recipe_json, run_name=run_name, input_model=model)
        _apply_resources(task, cluster.serve, cluster)


def compile_recipe(recipe: Recipe, output: Path) -> Path:
    """Write the pipeline IR YAML of ``recipe`` to ``output``."""
    compiler.Compiler().compile(build_pipeline(recipe), package_path=str(output))
    return output


def unpinned_images(package: Path) -> dict[str, list[str]]:
    """Container images of a compiled pipeline that are none of the pinned nemoforge images, with their tasks.

    A task in such an image (the demo's ``python:3.11-slim`` base_image) finds neither kfp nor nemoforge on a
    cluster; under ``kfp.local`` (``nemoforge run``) images are not used.

    Returns:
        ``{image: [task, ...]}`` (task names without the ``exec-`` prefix), empty when every image is pinned.
    """
    pinned = {spec["image"] for spec in load_images()["sets"].values()}
    ir = next(yaml.safe_load_all(package.read_text()))
    found: dict[str, list[str]] = {}
    for executor, spec in sorted(ir["deploymentSpec"]["executors"].items()):
        image = spec["container"]["image"]
        if image not in pinned:
            found.setdefault(image, []).append(executor.removeprefix("exec-"))
    return found

