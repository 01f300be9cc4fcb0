"""The process torchrun starts on every GPU of a TrainJob: ``torchrun --module nemoforge.cluster.worker``.

It runs the stage through :func:`nemoforge.runner.execute_stage` with the recipe and upstream
references that :func:`nemoforge.cluster.trainjob.build_trainjob` put in the environment, so a
TrainJob stage is keyed, resumed and recorded exactly like a stage in a task's own pod; the launcher
then reads the finished step from the index. torchrun sets ``RANK``/``LOCAL_RANK``/``WORLD_SIZE``;
``NEMOFORGE_DEEPSPEED_CONFIG`` holds the DeepSpeed config for the training layer.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from nemoforge.cluster.trainjob import TRAINING_STAGES


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nemoforge.cluster.worker")
    parser.add_argument("--stage", required=True, choices=TRAINING_STAGES)
    parser.add_argument("--run-name", required=True, help="the pipeline run (MLflow parent run, artifact prefix)")
    args = parser.parse_args(argv)

    from nemoforge.config import Recipe
    from nemoforge.runner import execute_stage, user_errors

    with user_errors():
        recipe = Recipe.model_validate_json(os.environ["NEMOFORGE_RECIPE_JSON"])
        inputs = json.loads(os.environ["NEMOFORGE_INPUTS_JSON"])
        execute_stage(args.stage, recipe, args.run_name, inputs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
