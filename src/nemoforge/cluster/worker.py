"""The process torchrun starts on every GPU of a TrainJob: ``torchrun --module nemoforge.cluster.worker``.

It runs the stage through :func:`nemoforge.runner.execute.execute_stage` with the recipe and upstream
references that :func:`nemoforge.cluster.trainjob.build_trainjob` put in the environment, so a
TrainJob stage is keyed, resumed and recorded exactly like a stage in a task's own pod; the launcher
then reads the finished step from the index. torchrun sets ``RANK``/``LOCAL_RANK``/``WORLD_SIZE``;
``NEMOFORGE_DEEPSPEED_CONFIG`` holds the DeepSpeed config for the training layer.

The worker is rank-aware: every rank first joins the process group
(:func:`nemoforge.training.distributed.init_from_env`). Rank 0 runs :func:`~nemoforge.runner.execute.execute_stage`
(key, index, MLflow run, export, upload) and broadcasts the output URI it trains under, or None when the
step's result is reused; every other rank then runs :func:`~nemoforge.runner.execute.join_stage` under that URI (its
share of each batch, no bookkeeping, no writes) or exits. With ``WORLD_SIZE`` 1 this is the single-process
stage.
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
    from nemoforge.runner.execute import execute_stage, join_stage, user_errors
    from nemoforge.training import distributed

    with user_errors():
        ctx = distributed.init_from_env()  # first: it picks this rank's GPU before any model is loaded
        recipe = Recipe.model_validate_json(os.environ["NEMOFORGE_RECIPE_JSON"])
        inputs = json.loads(os.environ["NEMOFORGE_INPUTS_JSON"])
        try:
            if ctx is None or ctx.is_main:
                execute_stage(args.stage, recipe, args.run_name, inputs, on_output=distributed.broadcast_from_main)
            else:
                output_uri = distributed.broadcast_from_main(None)
                if output_uri is not None:
                    join_stage(args.stage, recipe, inputs, output_uri)
            # every rank is done before any leaves the group: a rank that exits while another's gloo or
            # DeepSpeed threads still talk to it can abort (SIGABRT); after an error, no barrier (it would hang)
            distributed.barrier()
        finally:
            distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
