"""The ``nemoforge`` command's arguments: one subparser per command, the workdir's defaults."""

from __future__ import annotations

import argparse
from pathlib import Path

from nemoforge.config import builtin_recipes

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

