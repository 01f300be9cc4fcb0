"""The commands that render a recipe without running it: ``nemoforge show`` (the resolved recipe as YAML) and
``nemoforge compile`` (its KFP pipeline YAML)."""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from nemoforge.config import builtin_recipes, load_recipe
from nemoforge.errors import NemoforgeError


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
