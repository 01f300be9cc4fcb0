"""The KFP half of every step component: input artifacts in, the library's runner, the output artifacts out.

An artifact's metadata is the step reference (:data:`nemoforge.runner.index.Ref`): the library takes and
returns plain references and never sees a KFP object.
"""

from __future__ import annotations

import json
from typing import Any


def _refs(inputs: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The upstream references: each given input artifact's metadata, by name (``parent``, ``model``, ``corpus``,
    ``data``); an optional input left out of the pipeline (None) is left out."""
    return {name: dict(artifact.metadata) for name, artifact in inputs.items() if artifact is not None}


def _fill(outputs: dict[str, Any], refs: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Write each reference into the output artifact of its name: as its metadata, and as JSON at its path."""
    for name, output in outputs.items():
        output.metadata.update(refs[name])
        with open(output.path, "w") as f:
            json.dump(refs[name], f)
    return refs


def run_task(
    step: str, recipe_json: str, run_name: str, inputs: dict[str, Any], outputs: dict[str, Any]
) -> dict[str, dict[str, Any]]:
    """A step in this task's own pod: :func:`nemoforge.runner.execute.run_step`.

    Args:
        step: ``parent``, ``corpus``, or a stage (``nas`` ... ``serve``).
        recipe_json: the pipeline's ``recipe_json`` parameter.
        run_name: the pipeline run's name.
        inputs: the step's KFP input artifacts by name.
        outputs: the KFP output artifacts (``.metadata``, ``.path``) by the name of the reference each holds
            (``parent``, ``corpus``, ``model``, ``data``, ``responses``).

    Returns:
        The references written to ``outputs``, by name.
    """
    from nemoforge.config import Recipe
    from nemoforge.runner.execute import run_step, user_errors

    refs = _refs(inputs)
    with user_errors():
        produced = run_step(step, Recipe.model_validate_json(recipe_json), run_name, refs)
    return _fill(outputs, produced)


def launch_task(
    step: str, recipe_json: str, run_name: str, image: str, inputs: dict[str, Any], outputs: dict[str, Any]
) -> dict[str, dict[str, Any]]:
    """A training stage as a Kubeflow Trainer TrainJob of ``image`` that this task creates and waits for
    (:func:`nemoforge.cluster.launcher.launch_stage`); arguments as :func:`run_task`."""
    from nemoforge.cluster.launcher import launch_stage
    from nemoforge.config import Recipe
    from nemoforge.runner.execute import user_errors

    refs = _refs(inputs)
    with user_errors():
        produced = launch_stage(step, Recipe.model_validate_json(recipe_json), run_name, refs, image)
    return _fill(outputs, produced)
