"""Registration: the evaluated model becomes a version in the MLflow registry; the eval gate moves its aliases."""

from __future__ import annotations

from nemoforge.artifacts import store_for
from nemoforge.config import Recipe
from nemoforge.runner.index import Ref, model_ref
from nemoforge.stages.result import StageResult


def register_evaluated_model(
    recipe: Recipe, run_name: str, result: StageResult, inputs: dict[str, Ref]
) -> Ref:
    """Register the evaluated model in the MLflow registry; ``challenger`` always, ``champion`` when the gate passed.

    The eval stage decided the gate (tags ``gate``, ``gate_checks``); this records it: a new version of
    ``recipe.model.name`` tagged with the pipeline run, the upstream model and parent, the gate and the eval
    metrics. On promotion the champion's record (version, model URI, metrics, and the digest of the eval settings
    they were measured under) is written to the store, where the next eval's gate reads it.
    A failed gate is an outcome (the version stays ``challenger``), not an error. Registration happens once
    per eval output: a reused eval result returns its earlier record.

    Returns:
        The model reference extended with ``registered_name``, ``version``, ``aliases``, ``gate``.
    """
    from nemoforge import lineage
    from nemoforge.stages.eval.stage import champion_uri

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
        "nemoforge.upstream.model": inputs["model"]["uri"],
        "nemoforge.upstream.model_sha256": inputs["model"]["digest"],
        "nemoforge.upstream.parent": inputs["parent"]["uri"],
        **{f"nemoforge.metric.{k}": f"{v:.6g}" for k, v in result.metrics.items()},
    }
    # the pipeline run's input digests (check_inputs_step): what the next scheduled run compares with
    run_tags = lineage.Lineage.for_recipe(recipe).pipeline_run_tags(run_name)
    tags.update({k: v for k, v in run_tags.items() if k.startswith(lineage.TAG_INPUT_DIGEST)})
    registry = lineage.Registry(recipe.tracking.mlflow_uri)
    version = registry.register_model(recipe.model.name, result.outputs["model"], aliases=aliases, tags=tags)
    record = {
        "registered_name": recipe.model.name,
        "version": version,
        "aliases": aliases,
        "gate": tags["nemoforge.gate"],
    }
    if passed:
        champion = {
            "version": version,
            "model_uri": result.outputs["model"],
            "metrics": result.metrics,
            "eval_settings": result.tags.get("eval_settings"),
        }
        store.write_json(champion_uri(store, recipe.model.name), champion | {"pipeline_run": run_name})
    store.write_json(record_uri, record)
    return model_ref(result, **record)
