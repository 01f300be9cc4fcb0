"""Build one KFP v2 pipeline from a recipe: one task per enabled stage, resources from the recipe.

The recipe travels whole as the ``recipe_json`` pipeline parameter (editable in the Kubeflow UI); the
run name is KFP's job name, which is also the MLflow parent run's name and the artifact prefix.
KFP caching is off on every task: steps skip themselves by a key of their recipe section and input
digests (``nemoforge.runner``), which also works for launcher tasks whose inputs never change.
"""


# No `from __future__ import annotations` here: KFP reads the parameter types at definition time.
from collections.abc import Callable
from pathlib import Path

from kfp import compiler, dsl, kubernetes

from nemoforge.config import Recipe, StageResources
from nemoforge_components import make_components


def _apply_resources(task: dsl.PipelineTask, res: StageResources) -> dsl.PipelineTask:
    task.set_caching_options(enable_caching=False)
    task.set_cpu_request(res.cpu).set_cpu_limit(res.cpu)
    task.set_memory_request(res.memory).set_memory_limit(res.memory)
    if res.gpu_count:
        task.set_accelerator_type(res.accelerator_type).set_accelerator_limit(res.gpu_count)
    for label, value in res.node_selector.items():
        kubernetes.add_node_selector(task, label_key=label, label_value=value)
    for tol in res.tolerations:
        kubernetes.add_toleration(task, key=tol.key, operator=tol.operator, value=tol.value, effect=tol.effect)
    return task


def build_pipeline(recipe: Recipe) -> Callable:
    """The ``@dsl.pipeline`` function of ``recipe`` (disabled stages left out).

    The model flows parent -> nas -> distill -> cpt, each stage taking the newest model; distill also
    takes the parent as its teacher.
    """
    ops = make_components(recipe.resources.base_image)
    stages = recipe.enabled_stages()
    light = StageResources(cpu="1", memory="4Gi")

    @dsl.pipeline(name=f"nemoforge-{recipe.name}", description=recipe.description or recipe.name)
    def pipeline(recipe_json: str = recipe.to_json()):
        run_name = dsl.PIPELINE_JOB_NAME_PLACEHOLDER
        exit_task = ops["finalize"](recipe_json=recipe_json, run_name=run_name)
        _apply_resources(exit_task, light).set_display_name("finalize")
        with dsl.ExitHandler(exit_task, name="recipe"):
            parent = _apply_resources(ops["parent"](recipe_json=recipe_json), light)
            parent_model = parent.outputs["parent_model"]
            corpus_task = _apply_resources(
                ops["corpus"](recipe_json=recipe_json, parent_model=parent_model), recipe.resources.nas
            )
            corpus = corpus_task.outputs["corpus"]
            model = parent_model
            if "nas" in stages:
                task = ops["nas"](recipe_json=recipe_json, run_name=run_name, parent_model=parent_model, corpus=corpus)
                model = _apply_resources(task, recipe.resources.nas).outputs["model"]
            if "distill" in stages:
                task = ops["distill"](
                    recipe_json=recipe_json,
                    run_name=run_name,
                    parent_model=parent_model,
                    student_model=model,
                    corpus=corpus,
                )
                model = _apply_resources(task, recipe.resources.distill).outputs["model"]
            if "cpt" in stages:
                task = ops["cpt"](recipe_json=recipe_json, run_name=run_name, input_model=model, corpus=corpus)
                _apply_resources(task, recipe.resources.cpt)

    return pipeline


def compile_recipe(recipe: Recipe, output: Path) -> Path:
    """Write the pipeline IR YAML of ``recipe`` to ``output``."""
    compiler.Compiler().compile(build_pipeline(recipe), package_path=str(output))
    return output
