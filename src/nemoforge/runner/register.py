"""Registration: the evaluated model becomes a version in the MLflow registry; the eval gate moves its aliases."""

from __future__ import annotations

from typing import Any

from nemoforge.artifacts import store_for
from nemoforge.artifacts.uris import relative_uri
from nemoforge.config import Recipe
from nemoforge.runner.index import Ref, model_ref
from nemoforge.stages.result import StageResult

TAG_METRIC = "nemoforge.metric."
"""Prefix of a registered version's eval metric tags (values as Python float reprs: exact)."""
TAG_EVAL_SETTINGS = "nemoforge.eval_settings"
"""A registered version's tag: the digest of the eval settings its metrics were measured under."""


def register_evaluated_model(
    recipe: Recipe, run_name: str, result: StageResult, inputs: dict[str, Ref]
) -> Ref:
    """Register the evaluated model in the MLflow registry; ``challenger`` always, ``champion`` when the gate passed.

    The eval stage decided the gate (tags ``gate``, ``gate_checks``); this records it: a new version of
    ``recipe.model.name`` tagged with the pipeline run, the upstream model and parent, the gate and the eval
    metrics (full precision) and the digest of the eval settings they were measured under: the registry is
    the one record of the champion, which the next eval's gate reads (:func:`champion_record`).
    A failed gate is an outcome (the version stays ``challenger``), not an error. Registration happens once
    per eval output: a reused eval result returns its earlier record.

    Returns:
        The model reference extended with ``registered_name``, ``version``, ``aliases``, ``gate``.
    """
    from nemoforge import lineage

    store = store_for(recipe)
    record_uri = result.outputs["registration"]
    if store.exists(record_uri):
        return model_ref(result, **store.read_json(record_uri))
    passed = result.tags.get("gate") == "passed"
    aliases = ["challenger", "champion"] if passed else ["challenger"]
    tags = {
        "nemoforge.pipeline_run": run_name,
        "nemoforge.gate": result.tags.get("gate", "failed"),
        "nemoforge.gate_checks": result.tags.get("gate_checks", ""),
        "nemoforge.upstream.model": relative_uri(inputs["model"]["uri"], store.root_uri),
        "nemoforge.upstream.model_sha256": inputs["model"]["digest"],
        "nemoforge.upstream.parent": relative_uri(inputs["parent"]["uri"], store.root_uri),
        TAG_EVAL_SETTINGS: result.tags.get("eval_settings", ""),
        **{f"{TAG_METRIC}{k}": repr(float(v)) for k, v in result.metrics.items()},
    }
    # the pipeline run's input digests (check_inputs_step): what the next scheduled run compares with
    run_tags = lineage.Lineage.for_recipe(recipe).pipeline_run_tags(run_name)
    tags.update({k: v for k, v in run_tags.items() if k.startswith(lineage.TAG_INPUT_DIGEST)})
    registry = lineage.Registry.for_recipe(recipe)
    version = registry.register_model(recipe.model.name, result.outputs["model"], aliases=aliases, tags=tags)
    record = {
        "registered_name": recipe.model.name,
        "version": version,
        "aliases": aliases,
        "gate": tags["nemoforge.gate"],
    }
    store.write_json(record_uri, record)
    return model_ref(result, **record)


def champion_record(recipe: Recipe) -> dict[str, Any] | None:
    """The current champion of ``recipe.model.name`` as the eval gate compares with it; None when there is none.

    Read from the MLflow registry, the one record of the champion: the version alias ``champion`` points at,
    its source (the model URI, resolved against ``storage.artifact_root``), its eval metrics and the digest of
    the eval settings they were measured under (its tags, :func:`register_evaluated_model`).

    Returns:
        ``{"version", "model_uri", "metrics", "eval_settings"}`` (``eval_settings`` None when not recorded).
    """
    from nemoforge import lineage

    found = lineage.Registry.for_recipe(recipe).aliased_source(recipe.model.name, "champion")
    if found is None:
        return None
    version, source, tags = found
    return {
        "version": version,
        "model_uri": source,
        "metrics": {k.removeprefix(TAG_METRIC): float(v) for k, v in tags.items() if k.startswith(TAG_METRIC)},
        "eval_settings": tags.get(TAG_EVAL_SETTINGS) or None,
    }


def champion_inputs(recipe: Recipe) -> dict[str, Any]:
    """eval's keyword arguments from the registry: ``champion`` (:func:`champion_record`)."""
    return {"champion": champion_record(recipe)}
