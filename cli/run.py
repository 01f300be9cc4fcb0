"""``nemoforge run``: the recipe's pipeline end to end on this machine (kfp.local, MLflow on SQLite, a local
artifact store), each task's output in a log of its own, a stopped or failed run left resumable."""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
import warnings
from pathlib import Path

from nemoforge.config import Recipe, load_recipe
from nemoforge_cli.parser import TASK_LOGS
from nemoforge_cli.status import print_status, status_report


def _local_environment(workdir: Path, debug: bool, quiet: bool) -> None:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("NEMOFORGE_CACHE", str(workdir / "cache"))
    if quiet:
        os.environ["NEMOFORGE_NO_PROGRESS"] = "1"
    if quiet or not sys.stdout.isatty():  # transformers' "Loading weights" bars (and hf-hub's): noise in a file
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if debug:
        os.environ["NEMOFORGE_DEBUG"] = "1"


def _failure_reason(recipe: Recipe, error_file: Path, err: RuntimeError) -> str:
    """The failing step's own one-line message, else the stage error in MLflow, else kfp's summary."""
    from nemoforge import lineage

    if error_file.is_file():
        return error_file.read_text().strip()
    failed = [s for s in lineage.pipeline_status(lineage.Lineage.for_recipe(recipe)) if s.get("error")]
    if failed:
        return f"stage {failed[-1]['stage']}: {failed[-1]['error']}"
    return re.sub(r"\x1b\[[0-9;]*m", "", str(err)).splitlines()[0]


def _end_abandoned_runs(recipe: Recipe) -> None:
    """End as FAILED the pipeline runs left RUNNING by a `nemoforge run` that is gone (SIGKILL, a crash)."""
    from nemoforge import lineage
    from nemoforge.signals import owner_alive

    runs = lineage.Lineage.for_recipe(recipe)
    for run_name, owner in runs.pipeline_run_owners(running_only=True).items():
        if not owner_alive(owner):
            reason = f"abandoned: the `nemoforge run` that ran it (pid {owner.split()[-2]}) is gone"
            runs.finish_pipeline_run(run_name, "FAILED", reason)
            print(f"nemoforge: pipeline run {run_name} marked FAILED: {reason}", file=sys.stderr)


def _stopped(recipe: Recipe, args: argparse.Namespace, signal_name: str, owner: str) -> int:
    """After SIGTERM or SIGINT stopped the run (its process tree is gone): end this command's pipeline run and its
    stage runs still RUNNING as KILLED, say so, and return the shell's exit code for the signal."""
    from nemoforge import lineage
    from nemoforge.signals import exit_code

    reason = f"stopped by {signal_name}"
    runs = lineage.Lineage.for_recipe(recipe)
    mine = [name for name, o in runs.pipeline_run_owners(running_only=False).items() if o == owner]
    for run_name in mine:
        runs.finish_pipeline_run(run_name, "KILLED", reason)
    print(
        f"nemoforge: {reason}" + "".join(f": pipeline run {name} marked KILLED" for name in mine)
        + f"; re-run `nemoforge run {args.recipe}` to resume (see `nemoforge status --workdir {args.workdir}`)",
        file=sys.stderr,
    )
    return exit_code(signal_name)


def cmd_run(args: argparse.Namespace) -> int:
    from nemoforge import lineage
    from nemoforge.artifacts.cache import cache_root
    from nemoforge.preflight import check_inputs, check_parent, check_workdir, resolve_recipe
    from nemoforge.runner.retrain import OWNER_ENV, TASK_LOGS_ENV

    workdir = args.workdir.expanduser().resolve()
    recipe = resolve_recipe(load_recipe(args.recipe, args.overrides), workdir)
    check_workdir(workdir)
    _local_environment(workdir, args.debug, args.quiet)
    check_parent(recipe, cache_root() / "parent")
    check_inputs(recipe)
    workdir.mkdir(parents=True, exist_ok=True)

    from kfp import local

    from nemoforge.signals import ProcessTreeStop, owner_id
    from nemoforge_cli.console import task_console
    from nemoforge_pipelines import build_pipeline

    warnings.filterwarnings("ignore", message=".*have no effect in the current local runner.*")
    local.init(
        runner=local.SubprocessRunner(use_venv=False),
        pipeline_root=str(workdir / "kfp"),
        enable_caching=False,
        raise_on_error=True,
    )
    error_file = workdir / "last-error.txt"
    error_file.unlink(missing_ok=True)
    os.environ["NEMOFORGE_ERROR_FILE"] = str(error_file)
    owner = os.environ[OWNER_ENV] = owner_id()
    logs_name = os.environ[TASK_LOGS_ENV] = time.strftime("%Y%m%d-%H%M%S")
    task_logs = workdir / TASK_LOGS / logs_name
    _end_abandoned_runs(recipe)
    moved_from = lineage.Lineage.for_recipe(recipe).moved_artifact_location()
    if moved_from is not None:
        print(
            f"nemoforge: warning: MLflow keeps this experiment's run artifacts (recipe.json, plots) in {moved_from}, "
            "where the experiment was created (MLflow fixes that path); models, the registry, the step index and "
            "`nemoforge status` use this workdir",
            file=sys.stderr,
        )
    started = time.time()
    pipeline = build_pipeline(recipe)
    stop = ProcessTreeStop()
    try:
        with task_console(task_logs, progress=not args.quiet), stop:
            pipeline(recipe_json=recipe.to_json(), force=args.force)
    except (RuntimeError, KeyboardInterrupt) as err:
        if stop.signal_name is not None:
            return _stopped(recipe, args, stop.signal_name, owner)
        if isinstance(err, KeyboardInterrupt):
            raise
        print(f"nemoforge: error: {_failure_reason(recipe, error_file, err)}", file=sys.stderr)
        print(
            f"nemoforge: earlier stages' outputs are kept; fix the problem and re-run `nemoforge run {args.recipe}` "
            f"to resume (task logs: {task_logs}; see `nemoforge status --workdir {args.workdir}`)",
            file=sys.stderr,
        )
        return 1
    runs = lineage.Lineage.for_recipe(recipe)
    outcome = runs.pipeline_run_tags()
    if outcome.get(lineage.TAG_OUTCOME) == "skipped":
        print(f"\nnemoforge: {recipe.name} skipped in {time.time() - started:.0f} s: "
              f"{outcome.get('nemoforge.outcome_reason')} (--force retrains)")
        return 0
    print(f"\nnemoforge: {recipe.name} finished in {time.time() - started:.0f} s")
    registry = lineage.Registry.for_recipe(recipe)
    report = status_report(
        lineage.pipeline_summary(runs), registry.champions(), lineage.pipeline_status(runs), workdir
    )
    print_status(report)
    print(f"\nMLflow UI: mlflow ui --backend-store-uri {recipe.tracking.mlflow_uri}")
    return 0
