"""What every lineage module shares: the MLflow client, the tags that find runs, small helpers."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import LoggedModel, RunTag

from nemoforge.errors import RecipeError

log = logging.getLogger("nemoforge.lineage")

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
TAG_TASK_LOGS = "nemoforge.task_logs"
"""On parent runs of ``nemoforge run``: the directory of its task logs, under ``<workdir>/logs/``."""

MAX_DATASET_DIGEST_CHARS = 36
"""MLflow stores at most 36 characters of a dataset digest; the full sha256 goes in an input tag."""
MAX_PARAM_CHARS = 6000
MAX_TAG_CHARS = 8000
TERMINAL = ("FINISHED", "FAILED", "KILLED")


def open_client(tracking_uri: str | None) -> MlflowClient:
    """A client bound to ``tracking_uri`` for tracking and registry (a SQLite file's folder is created)."""
    if tracking_uri and tracking_uri.startswith("sqlite:///"):
        db_path = Path(tracking_uri.removeprefix("sqlite:///").split("?")[0])
        db_path.parent.mkdir(parents=True, exist_ok=True)
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def quoted(value: str, what: str) -> str:
    """``value`` in single quotes for an MLflow filter string."""
    if "'" in value or "`" in value:
        raise RecipeError(f"{what} {value!r} contains a quote: use letters, digits, '-', '_' and '.'")
    return f"'{value}'"


def make_tag(key: str, value: Any) -> RunTag:
    text = str(value)
    if len(text) > MAX_TAG_CHARS:
        log.warning("tag %s is %d characters: MLflow keeps the first %d", key, len(text), MAX_TAG_CHARS)
        text = text[:MAX_TAG_CHARS]
    return RunTag(key, text)


def now_ms() -> int:
    return int(time.time() * 1000)


def find_logged_model(client: MlflowClient, experiment_ids: list[str], model_uri: str) -> LoggedModel | None:
    """The newest LoggedModel recorded for ``model_uri``, if any."""
    if not experiment_ids:
        return None
    models = client.search_logged_models(
        experiment_ids,
        filter_string=f"tags.`{TAG_MODEL_URI}` = {quoted(model_uri, 'model URI')}",
        order_by=[{"field_name": "creation_timestamp", "ascending": False}],
        max_results=1,
    )
    return models[0] if models else None
