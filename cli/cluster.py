"""The commands that talk to a Kubeflow Pipelines cluster: ``nemoforge submit`` (one run) and
``nemoforge schedule`` (the recipe's recurring run; --list, --disable)."""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

from nemoforge.config import load_recipe
from nemoforge.errors import NemoforgeError


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
