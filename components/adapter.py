"""The KFP half of every step component: input artifacts in, the library's runner, the output artifact out.

An artifact's metadata is the step reference (:data:`nemoforge.runner.index.Ref`): the library takes and
returns plain references and never sees a KFP object.
"""

from __future__ import annotations

import json
from typing import Any


def _refs(inputs: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The upstream references: each input artifact's metadata, by name (``parent``, ``model``, ``corpus``)."""
    return {name: dict(artifact.metadata) for name, artifact in inputs.items()}


def _fill(output: Any, ref: dict[str, Any]) -> dict[str, Any]:
    """Write ``ref`` into the output artifact: as its metadata, and as JSON at its path."""
    output.metadata.update(ref)
    with open(output.path, "w") as f:
        json.dump(ref, f)
    return ref


def run_task(step: str, recipe_json: str, run_name: str, inputs: dict[str, Any], output: Any) -> dict[str, Any]:
    """A step in this task's own pod: :func:`nemoforge.runner.execute.run_step`.

    Args:
        step: ``parent``, ``corpus``, or a stage (``nas`` ... ``serve``).
        recipe_json: the pipeline's ``recipe_json`` parameter.
        run_name: the pipeline run's name.
        inputs: the step's KFP input artifacts by name.
        output: the KFP output artifact (``.metadata``, ``.path``).

    Returns:
        The reference written to ``output``.
    """
    from nemoforge.config import Recipe
    from nemoforge.runner.execute import run_step, user_errors

    refs = _refs(inputs)
    with user_errors():
        ref = run_step(step, Recipe.model_validate_json(recipe_json), run_name, refs)
    return _fill(output, ref)


def launch_task(
    step: str, recipe_json: str, run_name: str, image: str, inputs: dict[str, Any], output: Any
) -> dict[str, Any]:
    """A training stage as a Kubeflow Trainer TrainJob of ``image`` that this task creates and waits for
    (:func:`nemoforge.cluster.launcher.launch_stage`); arguments as :func:`run_task`."""
    from nemoforge.cluster.launcher import launch_stage
    from nemoforge.config import Recipe
    from nemoforge.runner.execute import user_errors

    refs = _refs(inputs)
    with user_errors():
        ref = launch_stage(step, Recipe.model_validate_json(recipe_json), run_name, refs, image)
    return _fill(output, ref)
