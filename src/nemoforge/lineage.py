"""Lineage in MLflow 3: the only module that imports mlflow.

Run hierarchy (one experiment, e.g. ``nemoforge``)::

    <pipeline_run>            parent run, tags nemoforge.kind=pipeline, nemoforge.pipeline_run=<name>
      ├─ nas                  nested run (tag mlflow.parentRunId), tags nemoforge.kind=stage, nemoforge.stage=nas
      ├─ distill
      └─ cpt

Runs are found by tags, not kept in process state, so each stage may run in its own pod. A stage run
records the resolved recipe (``recipe.json``), its settings as params (its own recipe section plus
``data``, ``seed``, ``dtype``) and its input URIs (``input.<name>``), the datasets it read
(``log_input`` with the dataset's sha256 and source URI), metrics with steps, plots, its output URIs and
digests (tags ``nemoforge.output.<name>``, ``nemoforge.digest.<name>``), and its output model as an
external MLflow 3 LoggedModel: the weights stay in the artifact store; MLflow holds the URI and digest,
and the registry's model versions point at that URI (:func:`register_model`).

Every function takes the tracking URI explicitly (the embedded default is ``sqlite:///<workdir>/mlflow.db``)
and uses an ``MlflowClient``: nothing here touches MLflow's global active run or tracking URI.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.data.dataset_source import DatasetSource
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import (
    DatasetInput,
    InputTag,
    LoggedModel,
    LoggedModelInput,
    LoggedModelOutput,
    LoggedModelStatus,
    Metric,
    Param,
    Run,
    RunTag,
)
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_MODEL_IS_EXTERNAL, MLFLOW_PARENT_RUN_ID

from nemoforge.config import STAGES, Recipe
from nemoforge.errors import InputNotFoundError, NemoforgeError, RecipeError, StorageError
from nemoforge.stages.result import DatasetRef, StageResult

log = logging.getLogger(__name__)

TAG_KIND = "nemoforge.kind"
"""``pipeline`` on parent runs, ``stage`` on stage runs."""
TAG_PIPELINE_RUN = "nemoforge.pipeline_run"
TAG_STAGE = "nemoforge.stage"
TAG_CONFIG_DIGEST = "nemoforge.config_digest"
"""sha256 of a stage run's params: a re-run with the same settings and inputs restarts this run."""
TAG_ATTEMPTS = "nemoforge.attempts"
TAG_ATTEMPT_START_MS = "nemoforge.attempt_start_ms"
TAG_ERROR = "nemoforge.error"
TAG_OUTPUT = "nemoforge.output."
TAG_DIGEST = "nemoforge.digest."
TAG_MODEL_URI = "nemoforge.model_uri"
"""On LoggedModels and model versions: where the weights are (a store URI)."""
TAG_SHA256 = "nemoforge.sha256"
TAG_INPUT_DIGEST = "nemoforge.input_digest."
"""On parent runs and the model versions they register: the digest of each pipeline input (runner.input_digests)."""
TAG_OUTCOME = "nemoforge.outcome"
"""On parent runs: ``retrain`` or ``skipped`` (inputs unchanged since the champion), with ``nemoforge.outcome_reason``."""
TAG_OWNER = "nemoforge.owner"
"""On parent runs of ``nemoforge run``: the command's process (:func:`nemoforge.signals.owner_id`)."""

MAX_DATASET_DIGEST_CHARS = 36
"""MLflow stores at most 36 characters of a dataset digest; the full sha256 goes in an input tag."""
_MAX_PARAM_CHARS = 6000
_MAX_TAG_CHARS = 8000
_TERMINAL = ("FINISHED", "FAILED", "KILLED")


# ------------------------------------------------------------------------------------------- clients
def _client(tracking_uri: str | None) -> MlflowClient:
    """A client bound to ``tracking_uri`` for tracking and registry (a SQLite file's folder is created)."""
    if tracking_uri and tracking_uri.startswith("sqlite:///"):
        db_path = Path(tracking_uri.removeprefix("sqlite:///").split("?")[0])
        db_path.parent.mkdir(parents=True, exist_ok=True)
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def _quoted(value: str, what: str) -> str:
    """``value`` in single quotes for an MLflow filter string."""
    if "'" in value or "`" in value:
        raise RecipeError(f"{what} {value!r} contains a quote: use letters, digits, '-', '_' and '.'")
    return f"'{value}'"


def default_artifact_location(tracking_uri: str | None) -> str | None:
    """Where an experiment's MLflow artifacts go by default: ``<dir of mlflow.db>/mlruns`` for SQLite.

    Returns:
        An absolute local path for a ``sqlite:///`` URI; None otherwise (the server decides).
    """
    if tracking_uri and tracking_uri.startswith("sqlite:///"):
        db_path = Path(tracking_uri.removeprefix("sqlite:///").split("?")[0])
        return str(db_path.resolve().parent / "mlruns")
    return None


def check_tracking(tracking_uri: str | None) -> None:
    """Check, before any compute, that the tracking store answers (one try, 5 s timeout over HTTP).

    Raises:
        StorageError: naming the tracking URI and the fix.
    """
    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ.update(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="5")
    try:
        _client(tracking_uri).search_experiments(max_results=1)
    except Exception as err:  # noqa: BLE001 (any failure means the store is unusable: say so in one line)
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        raise StorageError(
            f"cannot use the MLflow tracking store {tracking_uri} ({first_line}): start the tracking "
            "server or fix tracking.mlflow_uri"
        ) from None
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def ensure_experiment(tracking_uri: str | None, name: str, artifact_location: str | None = None) -> str:
    """The id of experiment ``name``, created when missing.

    Args:
        tracking_uri: MLflow tracking URI.
        name: experiment name.
        artifact_location: where MLflow keeps this experiment's artifacts (``recipe.json``, plots);
            None: :func:`default_artifact_location`. An existing experiment keeps its location.

    Returns:
        The experiment id.

    Raises:
        RecipeError: the experiment exists but was deleted.
    """
    client = _client(tracking_uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        location = artifact_location or default_artifact_location(tracking_uri)
        try:
            return client.create_experiment(name, artifact_location=location)
        except MlflowException as err:
            if err.error_code != "RESOURCE_ALREADY_EXISTS":  # lost a race with another process
                raise
            experiment = client.get_experiment_by_name(name)
            assert experiment is not None
    if experiment.lifecycle_stage == "deleted":
        raise RecipeError(
            f"MLflow experiment {name!r} at {tracking_uri} was deleted: restore it "
            f"(mlflow experiments restore --experiment-id {experiment.experiment_id}) or set tracking.experiment"
        )
    if artifact_location and experiment.artifact_location.removeprefix("file://") != artifact_location:
        log.warning(
            "experiment %s keeps its artifact location %s (asked for %s)",
            name,
            experiment.artifact_location,
            artifact_location,
        )
    return experiment.experiment_id


# ------------------------------------------------------------------------------------------- params
def _param_value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"nas": {"bld": {"steps": 40}}}`` -> ``{"nas.bld.steps": "40"}``; lists become JSON."""
    flat: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = _param_value(value)
    return flat


def stage_params(recipe: Recipe, stage: str, input_uris: Mapping[str, str] | None = None) -> dict[str, str]:
    """The params a stage run records: what the stage reads from the recipe, and its inputs.

    Returns:
        ``seed``, ``dtype``, ``data.*``, ``<stage>.*`` (when the recipe has a section of that name)
        and ``input.<name>`` per input URI, as strings.
    """
    resolved = recipe.model_dump(mode="json")
    params = {"seed": _param_value(resolved["seed"]), "dtype": _param_value(resolved["dtype"])}
    params.update(_flatten({"data": resolved["data"]}))
    if isinstance(resolved.get(stage), dict):
        params.update(_flatten({stage: resolved[stage]}))
    params.update({f"input.{name}": uri for name, uri in (input_uris or {}).items()})
    for key, value in params.items():
        if len(value) > _MAX_PARAM_CHARS:
            log.warning(
                "param %s is %d characters: MLflow keeps the first %d", key, len(value), _MAX_PARAM_CHARS
            )
            params[key] = value[:_MAX_PARAM_CHARS]
    return params


def _tag(key: str, value: Any) -> RunTag:
    text = str(value)
    if len(text) > _MAX_TAG_CHARS:
        log.warning("tag %s is %d characters: MLflow keeps the first %d", key, len(text), _MAX_TAG_CHARS)
        text = text[:_MAX_TAG_CHARS]
    return RunTag(key, text)


def _now_ms() -> int:
    return int(time.time() * 1000)


# --------------------------------------------------------------------------------------------- runs
def _find_parent(client: MlflowClient, experiment_id: str, pipeline_run: str | None) -> Run | None:
    """The parent run of ``pipeline_run`` (the oldest, should two exist), or the newest when None."""
    filters = [f"tags.`{TAG_KIND}` = 'pipeline'"]
    if pipeline_run is not None:
        filters.append(f"tags.`{TAG_PIPELINE_RUN}` = {_quoted(pipeline_run, 'pipeline run')}")
    runs = client.search_runs(
        [experiment_id],
        filter_string=" and ".join(filters),
        order_by=["attributes.start_time " + ("ASC" if pipeline_run is not None else "DESC")],
        max_results=1,
    )
    return runs[0] if runs else None


def _open_parent(client: MlflowClient, experiment_id: str, pipeline_run: str, recipe: Recipe) -> str:
    """The parent run id of ``pipeline_run``, created (or set RUNNING again) as needed."""
    parent = _find_parent(client, experiment_id, pipeline_run)
    if parent is None:
        created = client.create_run(
            experiment_id,
            run_name=pipeline_run,
            tags={TAG_KIND: "pipeline", TAG_PIPELINE_RUN: pipeline_run, "nemoforge.recipe": recipe.name},
        )
        client.log_text(created.info.run_id, recipe.model_dump_json(indent=2), "recipe.json")
        return created.info.run_id
    if parent.info.status != "RUNNING":  # a pipeline run resumed after it ended
        client.update_run(parent.info.run_id, status="RUNNING")
    return parent.info.run_id


def _stage_runs(
    client: MlflowClient, experiment_id: str, parent_id: str, stage: str | None = None
) -> list[Run]:
    filters = [f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent_id}'", f"tags.`{TAG_KIND}` = 'stage'"]
    if stage is not None:
        filters.append(f"tags.`{TAG_STAGE}` = {_quoted(stage, 'stage')}")
    return list(
        client.search_runs(
            [experiment_id], filter_string=" and ".join(filters), order_by=["attributes.start_time ASC"]
        )
    )


def _find_logged_model(client: MlflowClient, experiment_ids: list[str], model_uri: str) -> LoggedModel | None:
    """The newest LoggedModel recorded for ``model_uri``, if any."""
    if not experiment_ids:
        return None
    models = client.search_logged_models(
        experiment_ids,
        filter_string=f"tags.`{TAG_MODEL_URI}` = {_quoted(model_uri, 'model URI')}",
        order_by=[{"field_name": "creation_timestamp", "ascending": False}],
        max_results=1,
    )
    return models[0] if models else None


class StageTracker:
    """Logs one stage's outcome into its MLflow run (yielded by :func:`stage_run`).

    Attributes:
        run_id: the stage run's id.
        experiment_id: its experiment.
        parent_run_id: the pipeline run's parent run.
    """

    def __init__(
        self,
        client: MlflowClient,
        run_id: str,
        experiment_id: str,
        parent_run_id: str,
        stage: str,
        recipe: Recipe,
    ):
        self._client = client
        self.run_id = run_id
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self._stage = stage
        self._recipe = recipe

    def log_metrics(self, step: int, metrics: Mapping[str, float]) -> None:
        """Log metric points now, stamped with the wall clock: live progress while the stage runs.

        The signature of :data:`~nemoforge.training.loop.LogFn`, so the runner hands this method to a
        training stage as its ``on_log``; a stage killed later keeps every point logged so far.

        Args:
            step: optimizer step (or any increasing index).
            metrics: values by name, with the unit in the name where there is one (``loss``, ``tokens_per_s``).
        """
        now = _now_ms()
        self._client.log_batch(
            self.run_id, metrics=[Metric(name, float(v), now, int(step)) for name, v in metrics.items()]
        )

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set small string tags on the stage run (values are converted with ``str``)."""
        self._client.log_batch(self.run_id, tags=[_tag(k, v) for k, v in tags.items()])

    def log_result(self, result: StageResult) -> None:
        """Log a stage's :class:`StageResult` into its run; safe to call again with the same result.

        Metrics go in at step 0 and ``history`` as step metrics (points already logged with the same
        step and value, e.g. live via :meth:`log_metrics` or by an earlier attempt, are not repeated);
        each dataset through ``log_input`` with its digest and source URI; plots as artifacts under
        ``plots/``; outputs and digests as tags; ``outputs["model"]`` as an external LoggedModel that
        the final metrics are attached to.

        Raises:
            InputNotFoundError: a plot file does not exist.
            StorageError: an ``s3://`` plot cannot be downloaded.
        """
        tags = {f"{TAG_OUTPUT}{k}": v for k, v in result.outputs.items()}
        tags.update({f"{TAG_DIGEST}{k}": v for k, v in result.digests.items()})
        tags.update(result.tags)
        self.set_tags(tags)

        model_id = None
        if "model" in result.outputs:
            model_id = self._log_output_model(result.outputs["model"], result.digests.get("model"))

        now = _now_ms()
        points: dict[str, list[tuple[int, float]]] = {k: list(v) for k, v in result.history.items()}
        for name, value in result.metrics.items():
            points.setdefault(name, []).append((0, value))
        metrics = []
        for name, series in points.items():
            logged = {(m.step, m.value) for m in self._client.get_metric_history(self.run_id, name)}
            final = name in result.metrics
            for step, value in series:
                if (int(step), float(value)) not in logged:
                    on_model = model_id if final and step == 0 else None
                    metrics.append(Metric(name, float(value), now, int(step), model_id=on_model))
        self._client.log_batch(self.run_id, metrics=metrics)

        if result.datasets:
            self._client.log_inputs(self.run_id, datasets=[_dataset_input(ref) for ref in result.datasets])
        self._log_plots(result.plots)

    def _log_output_model(self, model_uri: str, digest: str | None) -> str:
        """Record the output model as an external LoggedModel of this run (once per URI); its id."""
        tags = {TAG_MODEL_URI: model_uri, TAG_STAGE: self._stage}
        if digest:
            tags[TAG_SHA256] = digest
        existing = _find_logged_model(self._client, [self.experiment_id], model_uri)
        if existing is not None and existing.source_run_id == self.run_id:
            self._client.set_logged_model_tags(existing.model_id, tags)
            return existing.model_id
        model = self._client.create_logged_model(
            self.experiment_id,
            name=f"{self._recipe.model.name}-{self._stage}",
            source_run_id=self.run_id,
            tags={MLFLOW_MODEL_IS_EXTERNAL: "true", **tags},
            model_type="nemotron-nas",
        )
        self._client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
        self._client.log_outputs(self.run_id, [LoggedModelOutput(model.model_id, step=0)])
        return model.model_id

    def _log_plots(self, plots: Mapping[str, str]) -> None:
        if not plots:
            return
        with tempfile.TemporaryDirectory() as tmp:
            for name, uri in plots.items():
                local = self._local_copy(uri)
                shutil.copyfile(local, Path(tmp) / f"{name}{local.suffix or '.png'}")
            self._client.log_artifacts(self.run_id, tmp, artifact_path="plots")

    def _local_copy(self, uri: str) -> Path:
        """A local path of a plot URI (``s3://`` through the recipe's store settings)."""
        from nemoforge.artifacts import open_store

        if uri.startswith("s3://"):
            storage = self._recipe.storage
            bucket_root = "/".join(uri.split("/")[:3])
            store = open_store(
                bucket_root, s3_endpoint_url=storage.s3_endpoint_url, s3_region=storage.s3_region,
                s3_checksums=storage.s3_checksums,
            )
            path = store.fetch(uri)
        else:
            path = Path(uri.removeprefix("file://")).expanduser()
        if not path.is_file():
            raise InputNotFoundError(f"plot {uri} is not a file: give a PNG file URI")
        return path


class _URISource(DatasetSource):
    """A dataset source MLflow has no resolver for (``hf://NAME``, ``teacher://...``): its URI."""

    def __init__(self, uri: str):
        self.uri = uri

    @staticmethod
    def _get_source_type() -> str:
        return "uri"

    def load(self) -> str:
        return self.uri

    @staticmethod
    def _can_resolve(raw_source: Any) -> bool:
        return False

    @classmethod
    def _resolve(cls, raw_source: Any) -> _URISource:
        return cls(str(raw_source))

    def to_dict(self) -> dict[str, Any]:
        return {"uri": self.uri}

    @classmethod
    def from_dict(cls, source_dict: dict[Any, Any]) -> _URISource:
        return cls(source_dict["uri"])


def _dataset_input(ref: DatasetRef) -> DatasetInput:
    """The ``log_inputs`` record of a dataset: MLflow's source for its URI, our digest, row count."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "can be interpreted in multiple ways" for local paths
            source = resolve_dataset_source(ref.source_uri)
    except MlflowException:
        source = _URISource(ref.source_uri)
    dataset = MetaDataset(source, name=ref.name, digest=ref.digest[:MAX_DATASET_DIGEST_CHARS])
    tags = [
        InputTag("mlflow.data.context", ref.context),
        InputTag("nemoforge.num_rows", str(ref.num_rows)),
        InputTag(TAG_SHA256, ref.digest),
    ]
    return DatasetInput(dataset._to_mlflow_entity(), tags=tags)


def _error_line(exc: BaseException) -> str:
    if isinstance(exc, KeyboardInterrupt):  # Ctrl-C, or a signal named by nemoforge.signals
        return f"stopped by {exc or 'SIGINT'}"
    text = " ".join(str(exc).split())
    if not isinstance(exc, NemoforgeError):
        text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text[:1000]


@contextmanager
def stage_run(
    tracking_uri: str | None,
    experiment: str,
    pipeline_run: str,
    stage: str,
    recipe: Recipe,
    *,
    input_uris: Mapping[str, str] | None = None,
) -> Iterator[StageTracker]:
    """Open (or resume) a stage's MLflow run inside its pipeline run's parent run.

    The parent run is found by tag ``nemoforge.pipeline_run`` (created, named ``pipeline_run``, when
    missing; set RUNNING again when it had ended). The stage run is the parent's child tagged
    ``nemoforge.stage`` whose params match this call's; a re-run with the same recipe section and
    inputs restarts that run (same run id, attempt counter ``nemoforge.attempts``), while changed
    settings get a new stage run (MLflow params cannot change). On entry it logs ``recipe.json``, the
    params (see :func:`stage_params`) and, for input URIs that are an earlier stage's output model,
    that LoggedModel as a model input.

    On leaving, the run gets metric ``wall_time_s`` (this attempt, step = attempt) and ends FINISHED;
    on an exception it ends FAILED (KILLED on KeyboardInterrupt/SystemExit) with tag
    ``nemoforge.error`` (one line), and the exception propagates. The parent run stays RUNNING:
    :func:`finish_pipeline_run` ends it.

    Args:
        tracking_uri: MLflow tracking URI (None: MLflow's default).
        experiment: experiment name (created when missing, see :func:`ensure_experiment`).
        pipeline_run: the pipeline run's name (parent run name and tag).
        stage: stage name (``nas``, ``distill``, ``cpt``): the nested run's name.
        recipe: the resolved recipe.
        input_uris: input URIs by argument name (``{"parent_uri": ..., "corpus_uri": ...}``).

    Yields:
        A :class:`StageTracker` for the run.

    Raises:
        RecipeError: the experiment was deleted, or a name contains a quote.
    """
    client = _client(tracking_uri)
    experiment_id = ensure_experiment(tracking_uri, experiment)
    parent_id = _open_parent(client, experiment_id, pipeline_run, recipe)
    params = stage_params(recipe, stage, input_uris)
    config_digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()

    previous = [
        r
        for r in _stage_runs(client, experiment_id, parent_id, stage)
        if r.data.tags.get(TAG_CONFIG_DIGEST) == config_digest
    ]
    if previous:
        run = previous[-1]
        run_id = run.info.run_id
        client.update_run(run_id, status="RUNNING")
        attempt = int(run.data.tags.get(TAG_ATTEMPTS, "0")) + 1
        had_error = TAG_ERROR in run.data.tags
    else:
        run_id = client.create_run(
            experiment_id,
            run_name=stage,
            tags={
                MLFLOW_PARENT_RUN_ID: parent_id,
                TAG_KIND: "stage",
                TAG_STAGE: stage,
                TAG_PIPELINE_RUN: pipeline_run,
                TAG_CONFIG_DIGEST: config_digest,
            },
        ).info.run_id
        attempt, had_error = 1, False
    started_ms = _now_ms()
    client.log_batch(
        run_id,
        params=[Param(k, v) for k, v in params.items()] if not previous else [],
        tags=[RunTag(TAG_ATTEMPTS, str(attempt)), RunTag(TAG_ATTEMPT_START_MS, str(started_ms))],
    )
    client.log_text(run_id, recipe.model_dump_json(indent=2), "recipe.json")
    _log_input_models(client, experiment_id, run_id, input_uris or {})

    tracker = StageTracker(client, run_id, experiment_id, parent_id, stage, recipe)
    try:
        yield tracker
    except BaseException as exc:
        status = "FAILED" if isinstance(exc, Exception) else "KILLED"
        try:
            client.log_batch(
                run_id,
                metrics=[Metric("wall_time_s", (_now_ms() - started_ms) / 1000, _now_ms(), attempt)],
                tags=[_tag(TAG_ERROR, _error_line(exc))],
            )
            client.set_terminated(run_id, status)
        except Exception as log_err:  # noqa: BLE001 (never hide the stage's exception behind a logging one)
            log.warning("could not mark MLflow run %s %s: %s", run_id, status, log_err)
        raise
    client.log_metric(run_id, "wall_time_s", (_now_ms() - started_ms) / 1000, step=attempt)
    if had_error:
        client.delete_tag(run_id, TAG_ERROR)
    client.set_terminated(run_id, "FINISHED")


def _log_input_models(
    client: MlflowClient, experiment_id: str, run_id: str, input_uris: Mapping[str, str]
) -> None:
    """Link input URIs that are an earlier stage's output model as model inputs of this run."""
    already = {m.model_id for m in client.get_run(run_id).inputs.model_inputs}
    models = []
    for uri in input_uris.values():
        model = _find_logged_model(client, [experiment_id], uri)
        if model is not None and model.model_id not in already:
            models.append(LoggedModelInput(model.model_id))
            already.add(model.model_id)
    if models:
        client.log_inputs(run_id, models=models)


def open_pipeline_run(tracking_uri: str | None, experiment: str, pipeline_run: str, recipe: Recipe) -> str:
    """Create (or set RUNNING again) the parent run of ``pipeline_run``; the pipeline's first task calls it.

    Returns:
        The parent run id.
    """
    client = _client(tracking_uri)
    return _open_parent(client, ensure_experiment(tracking_uri, experiment), pipeline_run, recipe)


def finish_pipeline_run(
    tracking_uri: str | None, experiment: str, pipeline_run: str, status: str, reason: str | None = None
) -> None:
    """End the parent run of ``pipeline_run``, and its stage runs still RUNNING, as ``status``.

    Args:
        tracking_uri: MLflow tracking URI.
        experiment: experiment name.
        pipeline_run: the pipeline run's name.
        status: ``FINISHED``, ``FAILED`` or ``KILLED``.
        reason: one line for tag ``nemoforge.error`` on each run it ends (e.g. ``stopped by SIGTERM``).

    Raises:
        ValueError: ``status`` is not one of those.
        InputNotFoundError: no parent run of that name exists in the experiment.
    """
    if status not in _TERMINAL:
        raise ValueError(f"status must be one of {_TERMINAL}, got {status!r}")
    client = _client(tracking_uri)
    experiment_obj = client.get_experiment_by_name(experiment)
    parent = _find_parent(client, experiment_obj.experiment_id, pipeline_run) if experiment_obj else None
    if parent is None:
        raise InputNotFoundError(
            f"no pipeline run {pipeline_run!r} in MLflow experiment {experiment!r} at {tracking_uri}"
        )
    stages = _stage_runs(client, parent.info.experiment_id, parent.info.run_id)
    for run in [*(r for r in stages if r.info.status == "RUNNING"), parent]:
        if reason is not None:
            client.set_tag(run.info.run_id, TAG_ERROR, reason)
        client.set_terminated(run.info.run_id, status)


def pipeline_run_owners(tracking_uri: str | None, experiment: str, *, running_only: bool) -> dict[str, str]:
    """The owner (tag ``nemoforge.owner``) of each pipeline run that has one, by run name.

    Args:
        tracking_uri: MLflow tracking URI.
        experiment: experiment name.
        running_only: only the runs still RUNNING.
    """
    client = _client(tracking_uri)
    experiment_obj = client.get_experiment_by_name(experiment)
    if experiment_obj is None:
        return {}
    filters = [f"tags.`{TAG_KIND}` = 'pipeline'"] + (["attributes.status = 'RUNNING'"] if running_only else [])
    runs = client.search_runs([experiment_obj.experiment_id], filter_string=" and ".join(filters))
    return {r.data.tags[TAG_PIPELINE_RUN]: r.data.tags[TAG_OWNER] for r in runs if TAG_OWNER in r.data.tags}


def set_pipeline_tags(tracking_uri: str | None, experiment: str, pipeline_run: str, tags: Mapping[str, str]) -> None:
    """Set tags on the parent run of ``pipeline_run`` (created when missing; see :func:`open_pipeline_run`).

    Raises:
        RecipeError: the experiment was deleted, or the run name contains a quote.
    """
    client = _client(tracking_uri)
    experiment_id = ensure_experiment(tracking_uri, experiment)
    parent = _find_parent(client, experiment_id, pipeline_run)
    if parent is None:
        raise InputNotFoundError(f"no pipeline run {pipeline_run!r} in MLflow experiment {experiment!r}: open it first")
    client.log_batch(parent.info.run_id, tags=[_tag(k, v) for k, v in tags.items()])


def pipeline_run_tags(tracking_uri: str | None, experiment: str, pipeline_run: str | None = None) -> dict[str, str]:
    """The tags and state of a pipeline's parent run (``pipeline_run`` None: the newest); ``{}`` when there is none.

    Returns:
        The run's tags plus ``"state"`` (``RUNNING``, ``FINISHED``, ...).
    """
    client = _client(tracking_uri)
    experiment_obj = client.get_experiment_by_name(experiment)
    parent = _find_parent(client, experiment_obj.experiment_id, pipeline_run) if experiment_obj else None
    return {**parent.data.tags, "state": parent.info.status} if parent is not None else {}


# ------------------------------------------------------------------------------------------- status
def _iso(ms: int | None) -> str | None:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="seconds") if ms else None


def pipeline_status(
    tracking_uri: str | None, experiment: str, pipeline_run: str | None = None
) -> list[dict[str, Any]]:
    """The stages of a pipeline run, for ``nemoforge status``.

    Args:
        tracking_uri: MLflow tracking URI.
        experiment: experiment name.
        pipeline_run: a pipeline run's name; None: the most recently started one.

    Returns:
        One dict per stage, in pipeline order (the latest attempt of each): ``pipeline_run``,
        ``pipeline_state``, ``stage``, ``run_id``, ``state`` (``RUNNING``, ``FINISHED``, ``FAILED``,
        ``KILLED``), ``start_time``/``end_time`` (ISO 8601 UTC of the latest attempt; ``end_time`` None
        while running), ``wall_time_s`` (of that attempt, so far while running), ``metrics`` (latest
        value of each), ``outputs`` (URIs by name), ``error`` (one line, or None), ``reused`` (the
        runner's tag ``nemoforge.reused``: the result came from an earlier run), ``gate`` (eval: ``passed`` or
        ``failed``; None for other stages) and ``gate_failed`` (eval: every failed criterion, one line each).
        Empty when the experiment has no pipeline run yet.

    Raises:
        InputNotFoundError: ``pipeline_run`` names no run in the experiment.
    """
    client = _client(tracking_uri)
    experiment_obj = client.get_experiment_by_name(experiment)
    parent = _find_parent(client, experiment_obj.experiment_id, pipeline_run) if experiment_obj else None
    if parent is None:
        if pipeline_run is not None:
            raise InputNotFoundError(
                f"no pipeline run {pipeline_run!r} in MLflow experiment {experiment!r} at {tracking_uri}"
            )
        return []
    latest: dict[str, Run] = {}
    for run in _stage_runs(client, parent.info.experiment_id, parent.info.run_id):
        stage = run.data.tags[TAG_STAGE]
        if stage not in latest or _attempt_start_ms(run) >= _attempt_start_ms(latest[stage]):
            latest[stage] = run
    order = {name: i for i, name in enumerate(STAGES)}
    runs = sorted(
        latest.values(), key=lambda r: (order.get(r.data.tags[TAG_STAGE], len(order)), _attempt_start_ms(r))
    )
    return [_stage_status(run, parent) for run in runs]


def _attempt_start_ms(run: Run) -> int:
    return int(run.data.tags.get(TAG_ATTEMPT_START_MS, run.info.start_time))


def _stage_status(run: Run, parent: Run) -> dict[str, Any]:
    tags = run.data.tags
    start_ms = _attempt_start_ms(run)
    ended = run.info.status in _TERMINAL
    end_ms = run.info.end_time if ended else None
    return {
        "pipeline_run": parent.data.tags.get(TAG_PIPELINE_RUN),
        "pipeline_state": parent.info.status,
        "stage": tags[TAG_STAGE],
        "run_id": run.info.run_id,
        "state": run.info.status,
        "start_time": _iso(start_ms),
        "end_time": _iso(end_ms),
        "wall_time_s": round(((end_ms or _now_ms()) - start_ms) / 1000, 3),
        "metrics": dict(run.data.metrics),
        "outputs": {k.removeprefix(TAG_OUTPUT): v for k, v in tags.items() if k.startswith(TAG_OUTPUT)},
        "error": tags.get(TAG_ERROR),
        "reused": tags.get("nemoforge.reused") == "true",
        "gate": tags.get("gate"),
        "gate_failed": [c.removeprefix("fail: ") for c in tags.get("gate_checks", "").split("; ") if c.startswith("fail: ")],
    }


# ----------------------------------------------------------------------------------------- registry
def register_model(
    tracking_uri: str | None,
    name: str,
    model_uri: str,
    *,
    aliases: Sequence[str] = (),
    tags: Mapping[str, str] | None = None,
) -> int:
    """Register the model at ``model_uri`` as a new version of ``name`` and point ``aliases`` at it.

    Nothing is copied: the version's source is ``model_uri`` itself (a local directory or an
    ``s3://`` prefix in the artifact store, servable from there). When a stage logged that URI as its
    output model, the version is linked to that stage run and LoggedModel (tag ``nemoforge.model_id``)
    and carries its digest (tag ``nemoforge.sha256``). Works with a SQLite or server-backed registry.

    Args:
        tracking_uri: MLflow tracking (and registry) URI.
        name: registered model name (created when missing).
        model_uri: the exported checkpoint's store URI.
        aliases: aliases to move to the new version (``challenger``, ``champion``).
        tags: extra model-version tags.

    Returns:
        The new version number.

    Raises:
        InputNotFoundError: a local ``model_uri`` does not exist.
    """
    if "://" not in model_uri:
        path = Path(model_uri).expanduser()
        if not path.exists():
            raise InputNotFoundError(f"model {model_uri} does not exist: nothing to register as {name}")
        model_uri = str(path.resolve())
    client = _client(tracking_uri)
    try:
        client.create_registered_model(name)
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    experiment_ids = [e.experiment_id for e in client.search_experiments()]
    logged = _find_logged_model(client, experiment_ids, model_uri)
    version_tags = {TAG_MODEL_URI: model_uri, **(tags or {})}
    if logged is not None:
        version_tags["nemoforge.model_id"] = logged.model_id
        if TAG_SHA256 in logged.tags:
            version_tags[TAG_SHA256] = logged.tags[TAG_SHA256]
    version = client.create_model_version(
        name,
        source=model_uri,
        run_id=logged.source_run_id if logged else None,
        tags=version_tags,
        model_id=logged.model_id if logged else None,
        await_creation_for=0,
    )
    for alias in aliases:
        client.set_registered_model_alias(name, alias, version.version)
    return int(version.version)


def aliased_version(tracking_uri: str | None, name: str, alias: str) -> tuple[int, dict[str, str]] | None:
    """The version that ``alias`` of registered model ``name`` points at and its tags; None when there is none."""
    client = _client(tracking_uri)
    try:
        version = client.get_model_version_by_alias(name, alias)
    except MlflowException as err:
        if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise
    return int(version.version), dict(version.tags)


def registered_model_source(tracking_uri: str | None, uri: str) -> str:
    """The store URI behind ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` (the version's source).

    Raises:
        InputNotFoundError: the name, alias or version is not in the registry.
    """
    spec = uri.removeprefix("models:/")
    name, sep, alias = spec.partition("@")
    client = _client(tracking_uri)
    try:
        if sep:
            version = client.get_model_version_by_alias(name, alias)
        else:
            name, _, number = spec.rpartition("/")
            version = client.get_model_version(name, number)
    except MlflowException as err:
        raise InputNotFoundError(f"{uri} is not in the model registry at {tracking_uri}: {err.message}") from None
    return version.tags.get(TAG_MODEL_URI) or version.source
