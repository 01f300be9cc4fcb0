"""``nemoforge`` command line: run, compile and inspect the recipe pipeline.

    nemoforge run smollm2-135m-demo                     # the whole recipe, locally (kfp.local)
    nemoforge run my.yaml --set distill.steps=10        # a recipe file, with overrides
    nemoforge compile smollm2-135m-demo -o pipeline.yaml
    nemoforge status --json
    nemoforge submit llama-3.1-8b --host https://kfp.example --experiment nemotron
    nemoforge schedule llama-3.1-8b --cron "0 0 3 * * 0" --host https://kfp.example
    nemoforge schedule --list --host https://kfp.example
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import sys
import time
import warnings
from pathlib import Path

from nemoforge.config import STAGES, Recipe, builtin_recipes, load_recipe
from nemoforge.errors import NemoforgeError
from nemoforge.stages.result import format_metrics, key_metrics

DEFAULT_WORKDIR = Path("nemoforge-work")
TASK_LOGS = "logs"
"""Under the workdir: one directory per `nemoforge run` (named by its start time), one log file per task in it
(``<task>.log``: every line the task wrote, the KFP executor's input included); `nemoforge status` names it."""

_RECIPE_HELP = (
    "a built-in recipe name ({names}) or a path to a recipe YAML; sections: name, description, seed, dtype, "
    "model, data, nas, distill, cpt, sft, rl, eval, serve, resources, tracking, storage "
    "(fields and units: src/nemoforge/config/)"
)


def _add_recipe_args(parser: argparse.ArgumentParser, optional: bool = False) -> None:
    parser.add_argument(
        "recipe", nargs="?" if optional else None, help=_RECIPE_HELP.format(names=", ".join(builtin_recipes()))
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY.PATH=VALUE",
        help="override a recipe field (value parsed as YAML), e.g. --set data.corpus_uri=corpus.txt; repeatable",
    )
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks")


_FORCE_HELP = (
    "run every stage even when the parent, the data (every data.*_uri) and the recipe have the "
    "digests recorded on the registered champion (pipeline parameter force=true); without it such a run is "
    "recorded as skipped (MLflow parent-run tag nemoforge.outcome=skipped) and ends after its first task"
)


def _add_kfp_args(parser: argparse.ArgumentParser, experiment_default: str | None = "nemoforge") -> None:
    parser.add_argument("--host", help="Kubeflow Pipelines API URL (default: $KF_PIPELINES_ENDPOINT, then in-cluster)")
    parser.add_argument(
        "--experiment",
        default=experiment_default,
        help="KFP experiment" + (" (%(default)s)" if experiment_default else " (schedule: nemoforge; --list: all)"),
    )
    parser.add_argument("--namespace", help="Kubernetes namespace of a multi-user KFP (the profile namespace)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nemoforge",
        description="Turn a Llama-family parent into an efficient model by the Llama-Nemotron recipe "
        "(Puzzle NAS -> distill -> cpt -> sft -> rl -> eval -> serve), run as a Kubeflow pipeline.",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser(
        "run",
        help="run a recipe end to end, locally (kfp.local, MLflow on SQLite, a local artifact store)",
        description="Run the recipe's pipeline locally with kfp.local. Embedded default under --workdir: "
        "mlflow.db (MLflow tracking), artifacts/ (artifact store, laid out like the S3 bucket), kfp/ "
        "(pipeline root), cache/ (parent conversion, downloads). Finished stages are reused on a re-run "
        "when their recipe section and inputs are unchanged; an interrupted stage resumes from its checkpoint.",
    )
    _add_recipe_args(run)
    run.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR, help="embedded default's root (%(default)s)")
    run.add_argument(
        "--quiet",
        action="store_true",
        help="no progress bars: each step's start, messages, results, errors and end only. Either way the console "
        "leaves out the KFP executor's detail (each task's executor input, the recipe JSON, output metadata): every "
        f"task's whole output is in WORKDIR/{TASK_LOGS}/<run start>/<task>.log, named by `nemoforge status`",
    )
    run.add_argument("--force", action="store_true", help=_FORCE_HELP)

    comp = sub.add_parser(
        "compile",
        help="compile a recipe into a KFP v2 pipeline YAML (upload it in the Kubeflow UI)",
        description="Write the pipeline IR YAML: one task per enabled stage with CPU/memory/GPU requests, "
        "node selectors and tolerations from the recipe's resources section.",
    )
    _add_recipe_args(comp)
    comp.add_argument("-o", "--output", type=Path, required=True, help="output YAML path")

    show = sub.add_parser(
        "show",
        help="print a recipe as it runs (its base: chain merged, --set applied, defaults filled); no recipe: list them",
        description="Print the resolved recipe as YAML: what every stage reads and logs as recipe.json. A recipe "
        "file states only its differences from its base: (built-in recipes extend _llama-cluster, ...); this is "
        "the whole of it. Without a recipe, list the built-in recipes with their descriptions.",
    )
    _add_recipe_args(show, optional=True)

    submit = sub.add_parser(
        "submit",
        help="upload the recipe's pipeline to Kubeflow Pipelines (a new version) and start a run",
        description="Compile the recipe, upload it as a new version of pipeline nemoforge-<recipe> (created the "
        "first time) and start one run in --experiment. Auth: NEMOFORGE_KFP_TOKEN (bearer), else the projected "
        "service-account token at KF_PIPELINES_SA_TOKEN_PATH, else kfp.Client's defaults.",
    )
    _add_recipe_args(submit)
    _add_kfp_args(submit)
    submit.add_argument("--force", action="store_true", help=_FORCE_HELP)

    sched = sub.add_parser(
        "schedule",
        help="create or replace the recipe's recurring run (scheduled retraining); --list, --disable NAME",
        description="Compile and upload the recipe as a new pipeline version, then replace the recurring run "
        "nemoforge-<recipe> of --experiment with one on that version (max_concurrency=1, no catch-up). "
        "Running it again is safe: it leaves exactly one schedule per recipe. Each scheduled run first compares "
        "its inputs' digests with the registered champion's and ends early, recorded as skipped, when nothing "
        "changed (--force: retrain every time).",
    )
    sched.add_argument("recipe", nargs="?", help=_RECIPE_HELP.format(names=", ".join(builtin_recipes())))
    sched.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE", help="override a recipe field"
    )
    sched.add_argument("--cron", help='6-field cron, seconds first (robfig/cron): "0 0 3 * * 0" = Sundays 03:00')
    sched.add_argument("--list", action="store_true", help="list the recurring runs (of --experiment when given)")
    sched.add_argument("--disable", metavar="NAME", help="disable the recurring runs named NAME")
    sched.add_argument("--force", action="store_true", help=_FORCE_HELP.replace("a run is", "a scheduled run is"))
    _add_kfp_args(sched, experiment_default=None)

    status = sub.add_parser(
        "status",
        help="show the latest pipeline run: per step state, wall time, key metrics, artifact URIs",
        description="The latest (or --run) pipeline run of the workdir's MLflow store: its state and outcome "
        "(retrained or skipped, and why), its input digests and each champion; then one row per step (check-inputs, "
        "parent, corpus, then each stage): its state (RUNNING, FINISHED, FAILED, KILLED; a reused step says so), "
        "wall time, key metrics (eval: toggle compliance, pass@1 and speedup first) and artifact URIs, and the "
        "promotion gate's outcome. --json prints the same as one object, the rows under \"stages\".",
    )
    status.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR, help="embedded default's root (%(default)s)")
    status.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite:///<workdir>/mlflow.db)")
    status.add_argument("--experiment", default="nemoforge", help="MLflow experiment (%(default)s)")
    status.add_argument("--run", dest="run_name", help="pipeline run name (default: the latest)")
    status.add_argument("--json", action="store_true", help="print JSON instead of a table")

    serve = sub.add_parser(
        "serve",
        help="serve a model with vLLM's OpenAI server until Ctrl-C, or write its KServe/Deployment manifests",
        description="Serve MODEL_URI (a checkpoint directory, a store URI such as s3://..., or a registry "
        "alias models:/NAME@ALIAS) with vLLM's OpenAI-compatible server on 127.0.0.1 until interrupted. "
        "With --emit, write a KServe InferenceService or a Deployment + Service for a cluster instead.",
    )
    serve.add_argument("model_uri", metavar="MODEL_URI", help="directory, s3:// URI or models:/NAME@ALIAS")
    serve.add_argument("--recipe", default="smollm2-135m-demo", help="recipe whose serve/resources.serve apply (%(default)s)")
    serve.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                       help="override a recipe field, e.g. --set serve.max_model_len=4096; repeatable")  # fmt: skip
    serve.add_argument("--port", type=int, help="port of the local server (default: serve.port)")
    serve.add_argument("--emit", choices=["kserve", "deployment"], help="write cluster manifests instead of serving")
    serve.add_argument("-o", "--output", type=Path, help="manifest file for --emit (default: stdout)")
    serve.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR,
                       help="embedded default's root (%(default)s): its registry, and the artifact root that the "
                       "registry's relative model URIs resolve against (storage.artifact_root, else WORKDIR/artifacts)")  # fmt: skip
    serve.add_argument("--tracking-uri", help="MLflow registry for models:/ URIs (default: sqlite:///<workdir>/mlflow.db)")
    return parser


# ------------------------------------------------------------------------------------------- run
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
    _print_status(report)
    print(f"\nMLflow UI: mlflow ui --backend-store-uri {recipe.tracking.mlflow_uri}")
    return 0


# --------------------------------------------------------------------------------------- compile
def cmd_compile(args: argparse.Namespace) -> int:
    from nemoforge_pipelines import compile_recipe, unpinned_images

    recipe = load_recipe(args.recipe, args.overrides)
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        compile_recipe(recipe, args.output)
    except OSError as err:
        if err.filename is None or not str(args.output.resolve()).startswith(str(Path(err.filename).resolve())):
            raise
        raise NemoforgeError(f"-o {args.output}: cannot write it ({err.strerror}: {err.filename}): give a writable path") from None
    print(f"wrote {args.output} (pipeline nemoforge-{recipe.name}: {', '.join(recipe.enabled_stages())})")
    for image, tasks in unpinned_images(args.output).items():
        print(
            f"warning: tasks {', '.join(tasks)} run in {image}, not a pinned nemoforge image (python:3.11-slim, "
            "the demo's base_image, holds neither kfp nor nemoforge): this YAML runs under `nemoforge run` but not "
            "on a cluster as it stands unless that image holds nemoforge; set --set resources.image_set=train "
            "(pinned images: components/images/images.yaml) or a resources.base_image built with nemoforge",
            file=sys.stderr,
        )
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    import yaml

    if args.recipe is None:
        for name in builtin_recipes():
            print(f"{name}: {load_recipe(name).description}")
        return 0
    recipe = load_recipe(args.recipe, args.overrides)
    print(yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False, width=120), end="")
    arch = recipe.model.parent.architecture
    plan = recipe.eval_plan(arch) if arch else None
    if plan:  # a YAML comment: the output stays the recipe
        print(f"# eval plan (nemoforge.planning.plan_eval): {plan.describe()}")
    return 0


# ------------------------------------------------------------------------------- submit, schedule
def _publish(args: argparse.Namespace):
    """Load, check and compile the recipe, connect, upload a new pipeline version: (recipe, client, published)."""
    import tempfile

    from nemoforge_pipelines import compile_recipe, kfp_api

    recipe = load_recipe(args.recipe, args.overrides)
    kfp_api.check_cluster_recipe(recipe)
    warnings.filterwarnings("ignore", category=FutureWarning)
    client = kfp_api.connect(args.host, args.namespace)
    with tempfile.TemporaryDirectory() as tmp:
        package = compile_recipe(recipe, Path(tmp) / f"{recipe.name}.yaml")
        published = kfp_api.publish(client, recipe, package, args.namespace)
    print(f"pipeline {published.pipeline_name} version {published.version_name} ({published.version_id})")
    return recipe, client, published


def cmd_submit(args: argparse.Namespace) -> int:
    from nemoforge_pipelines import kfp_api

    recipe, client, published = _publish(args)
    run = kfp_api.submit(client, recipe, published, args.experiment, args.namespace, force=args.force)
    print(f"run {run.display_name} ({run.run_id}) started in experiment {args.experiment}")
    return 0


def cmd_schedule(args: argparse.Namespace) -> int:
    from nemoforge_pipelines import kfp_api

    modes = [m for m in ("recipe", "list", "disable") if getattr(args, m)]
    if len(modes) != 1:
        raise NemoforgeError("schedule takes one of: RECIPE --cron CRON, --list, --disable NAME")
    if args.list:
        rows = kfp_api.list_schedules(kfp_api.connect(args.host, args.namespace), args.experiment, args.namespace)
        for row in rows:
            print(f"{row['name']}\t{row['cron']}\t{row['mode']}\t{row['status']}\tversion {row['pipeline_version_id']}"
                  f"\t{row['id']}")
        if not rows:
            print("no recurring runs")
        return 0
    if args.disable:
        client = kfp_api.connect(args.host, args.namespace)
        count = kfp_api.disable_schedule(client, args.disable, args.experiment, args.namespace)
        print(f"disabled {count} recurring run(s) named {args.disable}")
        return 0
    if not args.cron:
        raise NemoforgeError('schedule RECIPE needs --cron, e.g. --cron "0 0 3 * * 0" (6 fields, seconds first)')
    kfp_api.check_cron(args.cron)
    experiment = args.experiment or "nemoforge"
    recipe, client, published = _publish(args)
    created, replaced = kfp_api.schedule(
        client, recipe, published, args.cron, experiment, args.namespace, force=args.force
    )
    print(
        f"recurring run {created.display_name} ({created.recurring_run_id}) on version {published.version_name}: "
        f"cron {args.cron!r} in experiment {experiment}" + (f", replacing {replaced}" if replaced else "")
    )
    return 0


# ---------------------------------------------------------------------------------------- status
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


def _print_status(report: dict) -> None:
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
        _print_status(report)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from nemoforge.artifacts import store_for
    from nemoforge.serving import manifests
    from nemoforge.serving.server import VLLMServer
    from nemoforge.signals import interrupt_on_signals

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    recipe = load_recipe(args.recipe, args.overrides)
    model_uri = args.model_uri
    if model_uri.startswith("models:/"):
        from nemoforge import lineage
        from nemoforge.preflight import resolve_recipe

        workdir = args.workdir.expanduser().resolve()
        resolved = resolve_recipe(recipe, workdir)  # the artifact root: the recipe's, else <workdir>/artifacts
        tracking_uri = args.tracking_uri or recipe.tracking.mlflow_uri
        if tracking_uri is None:
            if not (workdir / "mlflow.db").is_file():  # opening it would create an empty registry
                raise NemoforgeError(
                    f"{model_uri}: no registry under --workdir {args.workdir} (no mlflow.db): run "
                    f"`nemoforge run RECIPE --workdir {args.workdir}` first, or pass --tracking-uri"
                )
            tracking_uri = resolved.tracking.mlflow_uri
        registry = lineage.Registry(tracking_uri, resolved.storage.artifact_root)
        model_uri = registry.registered_model_source(model_uri)
    if args.emit:
        from nemoforge_components.images import image_ref

        if args.emit == "kserve":
            objects = [manifests.inferenceservice(recipe, model_uri, image=image_ref("serve"))]
        else:
            objects = manifests.deployment(recipe, model_uri, image=image_ref("serve"))
        text = manifests.to_yaml(objects)
        if args.output:
            args.output.write_text(text)
            print(f"wrote {', '.join(o['kind'] for o in objects)} to {args.output}", file=sys.stderr)
        else:
            print(text, end="")
        return 0
    model_dir = store_for(recipe, model_uri).fetch(model_uri)
    log_path = args.workdir.expanduser().resolve() / "serve" / f"server-{int(time.time())}.log"
    server = VLLMServer.for_recipe(model_dir, recipe, log_path=log_path, port=args.port)
    server.check()  # the model and the port first: the parser check takes ~7 s
    if recipe.serve.reasoning_parser:
        from nemoforge.serving.engine import check_reasoning_parser

        check_reasoning_parser(recipe.serve.reasoning_parser, str(model_dir))
    # SIGTERM (Kubernetes, systemd) stops it as Ctrl-C does: vLLM runs in its own session, so only we can stop it.
    with interrupt_on_signals():
        try:
            server.start()  # checks first (checkpoint, remote code, port, vLLM): a refusal is one line
            print(f"starting vLLM on {model_dir} (log: {log_path})", file=sys.stderr, flush=True)
            ready_s = server.wait_ready()
            print(
                f"serving {server.served_model_name} at {server.base_url}/v1 (ready in {ready_s:.0f} s); "
                "Ctrl-C or SIGTERM stops it",
                file=sys.stderr,
                flush=True,
            )
            code = server.process.wait()
            raise NemoforgeError(f"vLLM exited with code {code} (log: {log_path})")
        except KeyboardInterrupt:
            print("stopping vLLM", file=sys.stderr)
            return 0
        finally:
            server.stop()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.debug = getattr(args, "debug", False)
    commands = {
        "run": cmd_run,
        "compile": cmd_compile,
        "show": cmd_show,
        "submit": cmd_submit,
        "schedule": cmd_schedule,
        "status": cmd_status,
        "serve": cmd_serve,
    }
    try:
        code = commands[args.command](args)
        sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
        return code
    except BrokenPipeError:
        # the reader went away (`nemoforge status --json | head`): stop without a word, as Unix tools do on SIGPIPE;
        # stdout goes to /dev/null so that the interpreter's own flush at exit does not fail again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except NemoforgeError as err:
        if args.debug:
            raise
        print(f"nemoforge: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("nemoforge: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
