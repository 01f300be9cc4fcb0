"""The run hierarchy of one MLflow experiment: a parent run per pipeline run, a nested run per stage.

    <pipeline_run>            parent run, tags nemoforge.kind=pipeline, nemoforge.pipeline_run=<name>
      ├─ check-inputs         the preparation steps (config.PREPARATION_STEPS) are nested runs as the stages are
      ├─ parent
      ├─ corpus
      ├─ nas                  nested run (tag mlflow.parentRunId), tags nemoforge.kind=stage, nemoforge.stage=nas
      ├─ distill
      └─ cpt

Runs are found by tags, not kept in process state, so each stage may run in its own pod. A stage run
records the resolved recipe (``recipe.json``), its settings as params (its own recipe section plus
``data``, ``seed``, ``dtype``) and its input URIs (``input.<name>``), the datasets it read
(``log_input`` with the dataset's sha256 and source URI), metrics with steps, plots, its output URIs and
digests (tags ``nemoforge.output.<name>``, ``nemoforge.digest.<name>``), and its output model as an
external MLflow 3 LoggedModel: the weights stay in the artifact store; MLflow holds the URI and digest,
and the registry's model versions point at that URI (:mod:`nemoforge.lineage.registry`). Store URIs in params,
tags and LoggedModels are relative to a local artifact root (:func:`~nemoforge.artifacts.uris.relative_uri`), so a
moved or copied workdir keeps its lineage; MLflow's own artifact locations (``mlruns/``, where ``recipe.json`` and plots go)
stay absolute, as MLflow makes them.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.data.dataset_source import DatasetSource
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import (
    DatasetInput,
    InputTag,
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

from nemoforge.artifacts.uris import relative_uri
from nemoforge.config import Recipe
from nemoforge.errors import InputNotFoundError, NemoforgeError, RecipeError
from nemoforge.lineage.client import (
    MAX_DATASET_DIGEST_CHARS,
    MAX_PARAM_CHARS,
    TAG_ATTEMPT_START_MS,
    TAG_ATTEMPTS,
    TAG_CONFIG_DIGEST,
    TAG_DIGEST,
    TAG_ERROR,
    TAG_KIND,
    TAG_MODEL_URI,
    TAG_OUTPUT,
    TAG_OWNER,
    TAG_PIPELINE_RUN,
    TAG_SHA256,
    TAG_STAGE,
    TERMINAL,
    find_logged_model,
    log,
    make_tag,
    now_ms,
    open_client,
    quoted,
)
from nemoforge.stages.result import DatasetRef, StageResult


def default_artifact_location(tracking_uri: str | None) -> str | None:
    """Where an experiment's MLflow artifacts go by default: ``<dir of mlflow.db>/mlruns`` for SQLite.

    Returns:
        An absolute local path for a ``sqlite:///`` URI; None otherwise (the server decides).
    """
    if tracking_uri and tracking_uri.startswith("sqlite:///"):
        db_path = Path(tracking_uri.removeprefix("sqlite:///").split("?")[0])
        return str(db_path.resolve().parent / "mlruns")
    return None


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
        ``seed``, ``dtype``, ``data.*``, ``<stage>.*`` (when the recipe has a section of that name; the
        ``parent`` step: ``model.*``) and ``input.<name>`` per input URI, as strings.
    """
    resolved = recipe.model_dump(mode="json")
    params = {"seed": _param_value(resolved["seed"]), "dtype": _param_value(resolved["dtype"])}
    params.update(_flatten({"data": resolved["data"]}))
    section = "model" if stage == "parent" else stage  # the parent step converts recipe.model.parent
    if isinstance(resolved.get(section), dict):
        params.update(_flatten({section: resolved[section]}))
    params.update({f"input.{name}": uri for name, uri in (input_uris or {}).items()})
    for key, value in params.items():
        if len(value) > MAX_PARAM_CHARS:
            log.warning(
                "param %s is %d characters: MLflow keeps the first %d", key, len(value), MAX_PARAM_CHARS
            )
            params[key] = value[:MAX_PARAM_CHARS]
    return params


class Lineage:
    """The pipeline and stage runs of one MLflow experiment, through one client.

    Nothing here touches MLflow's global active run or tracking URI.

    Args:
        tracking_uri: MLflow tracking (and registry) URI; the embedded default is ``sqlite:///<workdir>/mlflow.db``
            (None: MLflow's default).
        experiment: experiment name (created on first write, see :meth:`ensure_experiment`).
        artifact_root: the artifact root in use (``storage.artifact_root``): store URIs under a local root are
            recorded relative to it and resolved against it when read (:func:`pipeline_status`). None: as they are.
    """

    def __init__(self, tracking_uri: str | None, experiment: str, artifact_root: str | None = None):
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.artifact_root = artifact_root
        self.client = open_client(tracking_uri)

    @classmethod
    def for_recipe(cls, recipe: Recipe) -> Lineage:
        """The experiment that ``recipe.tracking`` names, with the recipe's artifact root."""
        return cls(recipe.tracking.mlflow_uri, recipe.tracking.experiment, recipe.storage.artifact_root)

    def ensure_experiment(self, artifact_location: str | None = None) -> str:
        """The id of the experiment, created when missing.

        Args:
            artifact_location: where MLflow keeps this experiment's artifacts (``recipe.json``, plots);
                None: :func:`default_artifact_location`. An existing experiment keeps its location.

        Returns:
            The experiment id.

        Raises:
            RecipeError: the experiment exists but was deleted.
        """
        client = self.client
        experiment = client.get_experiment_by_name(self.experiment)
        if experiment is None:
            location = artifact_location or default_artifact_location(self.tracking_uri)
            try:
                return client.create_experiment(self.experiment, artifact_location=location)
            except MlflowException as err:
                if err.error_code != "RESOURCE_ALREADY_EXISTS":  # lost a race with another process
                    raise
                experiment = client.get_experiment_by_name(self.experiment)
                assert experiment is not None
        if experiment.lifecycle_stage == "deleted":
            raise RecipeError(
                f"MLflow experiment {self.experiment!r} at {self.tracking_uri} was deleted: restore it "
                f"(mlflow experiments restore --experiment-id {experiment.experiment_id}) or set tracking.experiment"
            )
        if artifact_location and experiment.artifact_location.removeprefix("file://") != artifact_location:
            log.warning(
                "experiment %s keeps its artifact location %s (asked for %s)",
                self.experiment,
                experiment.artifact_location,
                artifact_location,
            )
        return experiment.experiment_id

    def moved_artifact_location(self) -> str | None:
        """Where the experiment keeps its MLflow artifacts, when that is not beside this SQLite store.

        MLflow fixes an experiment's artifact location (``<workdir>/mlruns``) as an absolute path when it creates the
        experiment, so in a moved or copied workdir the new runs' ``recipe.json`` and plots still go to the old
        place. None when the location is the default, the store is not SQLite, or the experiment does not exist.
        """
        default = default_artifact_location(self.tracking_uri)
        experiment = self.client.get_experiment_by_name(self.experiment)
        if default is None or experiment is None:
            return None
        location = experiment.artifact_location.removeprefix("file://")
        return None if location == default else location

    def find_parent(self, pipeline_run: str | None) -> Run | None:
        """The parent run of ``pipeline_run`` (the oldest, should two exist), or the newest when None.

        None when the experiment or the run does not exist (nothing is created).
        """
        experiment = self.client.get_experiment_by_name(self.experiment)
        if experiment is None:
            return None
        filters = [f"tags.`{TAG_KIND}` = 'pipeline'"]
        if pipeline_run is not None:
            filters.append(f"tags.`{TAG_PIPELINE_RUN}` = {quoted(pipeline_run, 'pipeline run')}")
        runs = self.client.search_runs(
            [experiment.experiment_id],
            filter_string=" and ".join(filters),
            order_by=["attributes.start_time " + ("ASC" if pipeline_run is not None else "DESC")],
            max_results=1,
        )
        return runs[0] if runs else None

    def existing_parent(self, pipeline_run: str) -> Run:
        """The parent run of ``pipeline_run``.

        Raises:
            InputNotFoundError: no parent run of that name exists in the experiment.
        """
        parent = self.find_parent(pipeline_run)
        if parent is None:
            raise InputNotFoundError(
                f"no pipeline run {pipeline_run!r} in MLflow experiment {self.experiment!r} at {self.tracking_uri}"
            )
        return parent

    def stage_runs(self, parent: Run, stage: str | None = None) -> list[Run]:
        """The stage runs under ``parent`` (of ``stage`` only, when given), oldest first."""
        filters = [f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent.info.run_id}'", f"tags.`{TAG_KIND}` = 'stage'"]
        if stage is not None:
            filters.append(f"tags.`{TAG_STAGE}` = {quoted(stage, 'stage')}")
        return list(
            self.client.search_runs(
                [parent.info.experiment_id],
                filter_string=" and ".join(filters),
                order_by=["attributes.start_time ASC"],
            )
        )

    def open_pipeline_run(self, pipeline_run: str, recipe: Recipe) -> Run:
        """Create (or set RUNNING again) the parent run of ``pipeline_run``; the pipeline's first task calls it.

        Returns:
            The parent run.

        Raises:
            RecipeError: the experiment was deleted, or the run name contains a quote.
        """
        experiment_id = self.ensure_experiment()
        client = self.client
        parent = self.find_parent(pipeline_run)
        if parent is None:
            created = client.create_run(
                experiment_id,
                run_name=pipeline_run,
                tags={TAG_KIND: "pipeline", TAG_PIPELINE_RUN: pipeline_run, "nemoforge.recipe": recipe.name},
            )
            client.log_text(created.info.run_id, recipe.model_dump_json(indent=2), "recipe.json")
            return created
        if parent.info.status != "RUNNING":  # a pipeline run resumed after it ended
            client.update_run(parent.info.run_id, status="RUNNING")
            return client.get_run(parent.info.run_id)
        return parent

    def finish_pipeline_run(self, pipeline_run: str, status: str, reason: str | None = None) -> None:
        """End the parent run of ``pipeline_run``, and its stage runs still RUNNING, as ``status``.

        Args:
            pipeline_run: the pipeline run's name.
            status: ``FINISHED``, ``FAILED`` or ``KILLED``.
            reason: one line for tag ``nemoforge.error`` on each run it ends (e.g. ``stopped by SIGTERM``).

        Raises:
            ValueError: ``status`` is not one of those.
            InputNotFoundError: no parent run of that name exists in the experiment.
        """
        if status not in TERMINAL:
            raise ValueError(f"status must be one of {TERMINAL}, got {status!r}")
        parent = self.existing_parent(pipeline_run)
        for run in [*(r for r in self.stage_runs(parent) if r.info.status == "RUNNING"), parent]:
            if reason is not None:
                self.client.set_tag(run.info.run_id, TAG_ERROR, reason)
            self.client.set_terminated(run.info.run_id, status)

    def pipeline_run_owners(self, *, running_only: bool) -> dict[str, str]:
        """The owner (tag ``nemoforge.owner``) of each pipeline run that has one, by run name.

        Args:
            running_only: only the runs still RUNNING.
        """
        experiment = self.client.get_experiment_by_name(self.experiment)
        if experiment is None:
            return {}
        filters = [f"tags.`{TAG_KIND}` = 'pipeline'"] + (
            ["attributes.status = 'RUNNING'"] if running_only else []
        )
        runs = self.client.search_runs([experiment.experiment_id], filter_string=" and ".join(filters))
        return {
            r.data.tags[TAG_PIPELINE_RUN]: r.data.tags[TAG_OWNER] for r in runs if TAG_OWNER in r.data.tags
        }

    def set_pipeline_tags(self, pipeline_run: str, tags: Mapping[str, str]) -> None:
        """Set tags on the parent run of ``pipeline_run`` (open it first: :meth:`open_pipeline_run`).

        Raises:
            InputNotFoundError: no parent run of that name exists in the experiment.
        """
        parent = self.existing_parent(pipeline_run)
        self.client.log_batch(parent.info.run_id, tags=[make_tag(k, v) for k, v in tags.items()])

    def pipeline_run_tags(self, pipeline_run: str | None = None) -> dict[str, str]:
        """The tags and state of a pipeline's parent run (``pipeline_run`` None: the newest); ``{}`` when there is none.

        Returns:
            The run's tags plus ``"state"`` (``RUNNING``, ``FINISHED``, ...).
        """
        parent = self.find_parent(pipeline_run)
        return {**parent.data.tags, "state": parent.info.status} if parent is not None else {}

    @contextmanager
    def stage_run(
        self, pipeline_run: str, stage: str, recipe: Recipe, *, input_uris: Mapping[str, str] | None = None
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
        :meth:`finish_pipeline_run` ends it.

        Args:
            pipeline_run: the pipeline run's name (parent run name and tag).
            stage: stage name (``nas``, ``distill``, ``cpt``): the nested run's name.
            recipe: the resolved recipe.
            input_uris: input URIs by argument name (``{"parent_uri": ..., "corpus_uri": ...}``); the params record
                them relative to a local artifact root, so a re-run in a moved workdir restarts the same run.

        Yields:
            A :class:`StageTracker` for the run.

        Raises:
            RecipeError: the experiment was deleted, or a name contains a quote.
        """
        client = self.client
        parent = self.open_pipeline_run(pipeline_run, recipe)
        experiment_id, parent_id = parent.info.experiment_id, parent.info.run_id
        input_uris = {name: relative_uri(uri, self.artifact_root) for name, uri in (input_uris or {}).items()}
        params = stage_params(recipe, stage, input_uris)
        config_digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()

        previous = [
            r for r in self.stage_runs(parent, stage) if r.data.tags.get(TAG_CONFIG_DIGEST) == config_digest
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
        started_ms = now_ms()
        client.log_batch(
            run_id,
            params=[Param(k, v) for k, v in params.items()] if not previous else [],
            tags=[RunTag(TAG_ATTEMPTS, str(attempt)), RunTag(TAG_ATTEMPT_START_MS, str(started_ms))],
        )
        client.log_text(run_id, recipe.model_dump_json(indent=2), "recipe.json")
        self._log_input_models(experiment_id, run_id, input_uris)

        tracker = StageTracker(client, run_id, experiment_id, parent_id, stage, recipe, self.artifact_root)
        try:
            yield tracker
        except BaseException as exc:
            status = "FAILED" if isinstance(exc, Exception) else "KILLED"
            try:
                client.log_batch(
                    run_id,
                    metrics=[Metric("wall_time_s", (now_ms() - started_ms) / 1000, now_ms(), attempt)],
                    tags=[make_tag(TAG_ERROR, _error_line(exc))],
                )
                client.set_terminated(run_id, status)
            except Exception as log_err:  # noqa: BLE001 (never hide the stage's exception behind a logging one)
                log.warning("could not mark MLflow run %s %s: %s", run_id, status, log_err)
            raise
        client.log_metric(run_id, "wall_time_s", (now_ms() - started_ms) / 1000, step=attempt)
        if had_error:
            client.delete_tag(run_id, TAG_ERROR)
        client.set_terminated(run_id, "FINISHED")

    def _log_input_models(self, experiment_id: str, run_id: str, input_uris: Mapping[str, str]) -> None:
        """Link input URIs (as stored: :func:`~nemoforge.artifacts.uris.relative_uri`) that are an earlier stage's
        output model as model inputs of this run."""
        already = {m.model_id for m in self.client.get_run(run_id).inputs.model_inputs}
        models = []
        for uri in input_uris.values():
            model = find_logged_model(self.client, [experiment_id], uri)
            if model is not None and model.model_id not in already:
                models.append(LoggedModelInput(model.model_id))
                already.add(model.model_id)
        if models:
            self.client.log_inputs(run_id, models=models)


class StageTracker:
    """Logs one stage's outcome into its MLflow run (yielded by :meth:`Lineage.stage_run`).

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
        artifact_root: str | None,
    ):
        self._client = client
        self.run_id = run_id
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self._stage = stage
        self._recipe = recipe
        self._artifact_root = artifact_root

    def log_metrics(self, step: int, metrics: Mapping[str, float]) -> None:
        """Log metric points now, stamped with the wall clock: live progress while the stage runs.

        The signature of :data:`~nemoforge.training.loop.LogFn`, so the runner hands this method to a
        training stage as its ``on_log``; a stage killed later keeps every point logged so far.

        Args:
            step: optimizer step (or any increasing index).
            metrics: values by name, with the unit in the name where there is one (``loss``, ``tokens_per_s``).
        """
        now = now_ms()
        self._client.log_batch(
            self.run_id, metrics=[Metric(name, float(v), now, int(step)) for name, v in metrics.items()]
        )

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set small string tags on the stage run (values are converted with ``str``)."""
        self._client.log_batch(self.run_id, tags=[make_tag(k, v) for k, v in tags.items()])

    def log_result(self, result: StageResult) -> None:
        """Log a stage's :class:`StageResult` into its run; safe to call again with the same result.

        Metrics go in at step 0 and ``history`` as step metrics (points already logged with the same
        step and value, e.g. live via :meth:`log_metrics` or by an earlier attempt, are not repeated);
        each dataset through ``log_input`` with its digest and source URI; plots as artifacts under
        ``plots/`` and reports under ``reports/``; outputs and digests as tags; ``outputs["model"]`` as an external LoggedModel that
        the final metrics are attached to. Output URIs are recorded relative to a local artifact root.

        Raises:
            InputNotFoundError: a plot or report file does not exist.
            StorageError: an ``s3://`` plot or report cannot be downloaded.
        """
        outputs = {k: relative_uri(v, self._artifact_root) for k, v in result.outputs.items()}
        tags = {f"{TAG_OUTPUT}{k}": v for k, v in outputs.items()}
        tags.update({f"{TAG_DIGEST}{k}": v for k, v in result.digests.items()})
        tags.update(result.tags)
        self.set_tags(tags)

        model_id = None
        if "model" in outputs:
            model_id = self._log_output_model(outputs["model"], result.digests.get("model"))

        now = now_ms()
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
        self._log_files(result.plots, "plots", ".png")
        self._log_files(result.reports, "reports", ".json")

    def _log_output_model(self, model_uri: str, digest: str | None) -> str:
        """Record the output model (its URI as stored) as an external LoggedModel of this run (once per URI); its id."""
        tags = {TAG_MODEL_URI: model_uri, TAG_STAGE: self._stage}
        if digest:
            tags[TAG_SHA256] = digest
        existing = find_logged_model(self._client, [self.experiment_id], model_uri)
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

    def _log_files(self, files: Mapping[str, str], artifact_path: str, suffix: str) -> None:
        """Copy each file URI into the run as ``<artifact_path>/<name><its suffix, else suffix>``."""
        if not files:
            return
        with tempfile.TemporaryDirectory() as tmp:
            for name, uri in files.items():
                local = self._local_copy(uri, f"{artifact_path} {name}")
                shutil.copyfile(local, Path(tmp) / f"{name}{local.suffix or suffix}")
            self._client.log_artifacts(self.run_id, tmp, artifact_path=artifact_path)

    def _local_copy(self, uri: str, what: str) -> Path:
        """A local path of a plot or report URI (``s3://`` through the recipe's store settings)."""
        from nemoforge.artifacts import store_for

        if uri.startswith("s3://"):
            path = store_for(self._recipe, uri).fetch(uri)
        else:
            path = Path(uri.removeprefix("file://")).expanduser()
        if not path.is_file():
            raise InputNotFoundError(f"{what}: {uri} is not a file")
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
