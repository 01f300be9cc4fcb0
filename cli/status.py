"""``nemoforge status``: the latest (or a named) pipeline run of a workdir, its head (state, outcome, inputs,
champions) and one row per step; the same report ``nemoforge run`` prints when it ends."""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

from nemoforge.config import STAGES
from nemoforge.errors import NemoforgeError
from nemoforge.stages.result import format_metrics, key_metrics
from nemoforge_cli.parser import TASK_LOGS

_NUM_STATUS_METRICS = 8
"""How many of a step's metrics a `status` row shows (:func:`nemoforge.stages.result.key_metrics`)."""


_NO_PIPELINE_RUN = {
    "pipeline_run": None, "state": None, "outcome": None, "outcome_reason": None, "inputs": {}, "start_time": None,
    "end_time": None, "task_logs": None,
}
"""The head's fields (:func:`nemoforge.lineage.pipeline_summary`'s) when the experiment has no pipeline run."""


def status_report(
    summary: dict | None, champions: list[tuple[str, int, dict[str, str]]], stages: list[dict], workdir: Path
) -> dict:
    """What `status` shows, as `status --json` prints it: the head, then the rows under ``stages``.

    Args:
        summary: :func:`nemoforge.lineage.pipeline_summary` (None: no pipeline run yet).
        champions: :meth:`nemoforge.lineage.Registry.champions`.
        stages: :func:`nemoforge.lineage.pipeline_status` (the preparation steps, then the stages).
        workdir: the workdir, whose ``logs/`` holds the task logs of `nemoforge run`.

    Returns:
        The pipeline run's ``pipeline_run``, ``state``, ``outcome`` (``retrain``, ``skipped`` or None),
        ``outcome_reason``, ``inputs``, ``start_time``, ``end_time`` and ``task_logs`` (the directory of the run's
        task logs, one ``<step>.log`` per step; None for a run that `nemoforge run` did not start) (all None when
        there is no run);
        ``champions`` (``name``, ``version``, ``pipeline_run`` that registered it, ``model_uri``: the alias URI);
        and ``stages`` (each with ``log``: its task log, when that file exists; else None).
    """
    head = dict(summary if summary is not None else _NO_PIPELINE_RUN)
    logs = workdir / TASK_LOGS / head["task_logs"] if head.get("task_logs") else None
    head["task_logs"] = str(logs) if logs is not None else None
    return {
        **head,
        "champions": [
            {"name": name, "version": version, "pipeline_run": tags.get("nemoforge.pipeline_run"),
             "model_uri": f"models:/{name}@champion"}
            for name, version, tags in champions
        ],
        "stages": [
            {**s, "log": str(logs / f"{s['stage']}.log") if logs and (logs / f"{s['stage']}.log").is_file() else None}
            for s in stages
        ],
    }  # fmt: skip


def status_head(report: dict) -> list[str]:
    """The lines above the step table (from :func:`status_report`): the pipeline run's state and outcome, its
    inputs, each champion."""
    if report["pipeline_run"] is None:
        return ["no pipeline run found"]
    outcome = report["outcome"] or "not decided yet"
    if report["outcome_reason"]:
        outcome += f": {report['outcome_reason']}"
    lines = [f"pipeline run {report['pipeline_run']}: {report['state']}, {outcome}"]
    if report["inputs"]:
        lines.append("inputs: " + ", ".join(f"{k} {v[:12]}" for k, v in report["inputs"].items()))
    for champion in report["champions"]:
        lines.append(
            f"champion: {champion['name']} v{champion['version']} "
            f"(pipeline run {champion['pipeline_run'] or '?'}; {champion['model_uri']})"
        )
    if not report["champions"]:
        lines.append("champion: none yet")
    if report["task_logs"]:
        lines.append(f"task logs: {report['task_logs']}/<step>.log (each step's whole output)")
    return lines


def print_status(report: dict) -> None:
    print("\n".join(status_head(report)))
    if report["pipeline_run"] is None:
        return
    stages = report["stages"]
    if stages:
        _print_step_table(report["pipeline_run"], stages)
    # a skipped run has the check-inputs row alone (a run still preparing its parent or corpus: say nothing yet)
    if not any(s["stage"] in STAGES for s in stages) and (not stages or report["state"] != "RUNNING"):
        print("no stage ran in this pipeline run" + (" (skipped)" if report["outcome"] == "skipped" else ""))


def _print_step_table(pipeline_run: str, stages: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"pipeline run {pipeline_run}")
    for column in ("step", "state", "wall s", "key metrics", "outputs"):
        table.add_column(column, overflow="fold")
    for s in stages:
        metrics = format_metrics(key_metrics(s["stage"], s.get("metrics", {}), _NUM_STATUS_METRICS))
        outputs = "\n".join(f"{k}: {v}" for k, v in s.get("outputs", {}).items())
        state = s["state"] + (" (reused)" if s.get("reused") else "")
        if s.get("gate"):
            state += f"\ngate {s['gate']}" + "".join(f"\n- {c}" for c in s.get("gate_failed", []))
        if s.get("error"):
            state += f"\n{s['error']}"
            if s.get("log"):
                state += f"\nlog: {s['log']}"
        wall = s.get("wall_time_s")
        table.add_row(s["stage"], state, f"{wall:.0f}" if wall is not None else "-", metrics, outputs)
    # the terminal's width ($COLUMNS first); 160 when the output is not a terminal (a file, a pipe)
    Console(width=shutil.get_terminal_size((160, 24)).columns).print(table)


def cmd_status(args: argparse.Namespace) -> int:
    workdir = args.workdir.expanduser().resolve()
    if workdir.is_file():  # before mlflow's import (seconds)
        raise NemoforgeError(f"--workdir {args.workdir}: {workdir} is a file, not a directory: give a run's workdir")
    from nemoforge import lineage

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    tracking_uri = args.tracking_uri or f"sqlite:///{workdir / 'mlflow.db'}"
    if not args.tracking_uri and not (workdir / "mlflow.db").is_file():
        raise NemoforgeError(f"no runs under {workdir}: run `nemoforge run RECIPE --workdir {args.workdir}` first")
    # the embedded default's artifact root: stored output URIs are relative to it (a moved or copied workdir)
    runs = lineage.Lineage(tracking_uri, args.experiment, str(workdir / "artifacts"))
    report = status_report(
        lineage.pipeline_summary(runs, args.run_name),
        lineage.Registry(tracking_uri, runs.artifact_root).champions(),
        lineage.pipeline_status(runs, args.run_name),  # in pipeline order
        workdir,
    )
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        print_status(report)
    return 0
