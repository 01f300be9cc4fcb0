"""``nemoforge status``: the stages of a pipeline run as the MLflow runs record them."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from mlflow.entities import Run

from nemoforge.artifacts.uris import resolve_uri
from nemoforge.config import PREPARATION_STEPS, STAGES
from nemoforge.lineage.client import (
    TAG_ATTEMPT_START_MS,
    TAG_ERROR,
    TAG_INPUT_DIGEST,
    TAG_OUTCOME,
    TAG_OUTPUT,
    TAG_PIPELINE_RUN,
    TAG_STAGE,
    TAG_TASK_LOGS,
    TERMINAL,
    now_ms,
)
from nemoforge.lineage.runs import Lineage


def pipeline_status(lineage: Lineage, pipeline_run: str | None = None) -> list[dict[str, Any]]:
    """The steps of a pipeline run, for ``nemoforge status``: the preparation steps, then the stages.

    Args:
        lineage: the experiment's runs.
        pipeline_run: a pipeline run's name; None: the most recently started one.

    Returns:
        One dict per step that has a run, in pipeline order (``check-inputs``, ``parent``, ``corpus``, then the
        stages; the latest attempt of each): ``pipeline_run``, ``pipeline_state``, ``stage`` (the step's name),
        ``run_id``, ``state`` (``RUNNING``, ``FINISHED``, ``FAILED``, ``KILLED``), ``start_time``/``end_time`` (ISO 8601 UTC of the latest attempt; ``end_time`` None
        while running), ``wall_time_s`` (of that attempt, so far while running), ``metrics`` (latest
        value of each), ``outputs`` (URIs by name, resolved against ``lineage.artifact_root``), ``error``
        (one line, or None), ``reused`` (the runner's tag ``nemoforge.reused``: the result came from an earlier
        run), ``gate`` (eval: ``passed`` or ``failed``; None for other stages) and ``gate_failed`` (eval: every
        failed criterion, one line each).
        Empty when the experiment has no pipeline run yet.

    Raises:
        InputNotFoundError: ``pipeline_run`` names no run in the experiment.
    """
    if pipeline_run is not None:
        parent = lineage.existing_parent(pipeline_run)
    else:
        parent = lineage.find_parent(None)
        if parent is None:
            return []
    latest: dict[str, Run] = {}
    for run in lineage.stage_runs(parent):
        stage = run.data.tags[TAG_STAGE]
        if stage not in latest or _attempt_start_ms(run) >= _attempt_start_ms(latest[stage]):
            latest[stage] = run
    order = {name: i for i, name in enumerate((*PREPARATION_STEPS, *STAGES))}
    runs = sorted(
        latest.values(), key=lambda r: (order.get(r.data.tags[TAG_STAGE], len(order)), _attempt_start_ms(r))
    )
    return [_stage_status(run, parent, lineage.artifact_root) for run in runs]


def pipeline_summary(lineage: Lineage, pipeline_run: str | None = None) -> dict[str, Any] | None:
    """The pipeline run itself, for the head of ``nemoforge status``; None when the experiment has none.

    Args:
        lineage: the experiment's runs.
        pipeline_run: a pipeline run's name; None: the most recently started one.

    Returns:
        ``pipeline_run``, ``state`` (the parent run's: ``RUNNING``, ``FINISHED``, ``FAILED``, ``KILLED``),
        ``outcome`` (the first task's decision, ``retrain`` or ``skipped``; None before it decided),
        ``outcome_reason`` (e.g. ``inputs unchanged since champion NAME v1 (pipeline run ...)``), ``inputs``
        (each input's digest by name: ``parent``, ``corpus``, ``recipe``, ...), ``start_time``, ``end_time``,
        ``task_logs`` (under ``nemoforge run``: its task-log directory's name under ``<workdir>/logs/``; else None).

    Raises:
        InputNotFoundError: ``pipeline_run`` names no run in the experiment.
    """
    parent = lineage.existing_parent(pipeline_run) if pipeline_run is not None else lineage.find_parent(None)
    if parent is None:
        return None
    tags = parent.data.tags
    ended = parent.info.status in TERMINAL
    return {
        "pipeline_run": tags.get(TAG_PIPELINE_RUN),
        "state": parent.info.status,
        "outcome": tags.get(TAG_OUTCOME),
        "outcome_reason": tags.get("nemoforge.outcome_reason"),
        "inputs": {k.removeprefix(TAG_INPUT_DIGEST): v for k, v in sorted(tags.items()) if k.startswith(TAG_INPUT_DIGEST)},
        "start_time": _iso(parent.info.start_time),
        "end_time": _iso(parent.info.end_time if ended else None),
        "task_logs": tags.get(TAG_TASK_LOGS),
    }


def _iso(ms: int | None) -> str | None:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="seconds") if ms else None


def _attempt_start_ms(run: Run) -> int:
    return int(run.data.tags.get(TAG_ATTEMPT_START_MS, run.info.start_time))


def _stage_status(run: Run, parent: Run, artifact_root: str | None) -> dict[str, Any]:
    tags = run.data.tags
    start_ms = _attempt_start_ms(run)
    ended = run.info.status in TERMINAL
    end_ms = run.info.end_time if ended else None
    return {
        "pipeline_run": parent.data.tags.get(TAG_PIPELINE_RUN),
        "pipeline_state": parent.info.status,
        "stage": tags[TAG_STAGE],
        "run_id": run.info.run_id,
        "state": run.info.status,
        "start_time": _iso(start_ms),
        "end_time": _iso(end_ms),
        "wall_time_s": round(((end_ms or now_ms()) - start_ms) / 1000, 3),
        "metrics": dict(run.data.metrics),
        "outputs": {
            k.removeprefix(TAG_OUTPUT): resolve_uri(v, artifact_root)
            for k, v in tags.items()
            if k.startswith(TAG_OUTPUT)
        },
        "error": tags.get(TAG_ERROR),
        "reused": tags.get("nemoforge.reused") == "true",
        "gate": tags.get("gate"),
        "gate_failed": [
            c.removeprefix("fail: ")
            for c in tags.get("gate_checks", "").split("; ")
            if c.startswith("fail: ")
        ],
    }
