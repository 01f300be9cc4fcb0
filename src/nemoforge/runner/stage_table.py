"""The one table of stages: where each stage's ``run()`` lives and how the runner treats it.

Every stage name (``nas`` ... ``serve``) has one :class:`StageEntry`; the runner, the TrainJob launcher and the
worker look a stage up here instead of branching on its name. A stage module is imported only when its stage
runs (:meth:`StageEntry.run_fn`), so a task that runs one stage loads that stage's dependencies alone.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from nemoforge.config import Recipe
from nemoforge.runner.index import Ref, model_ref, step_key
from nemoforge.runner.register import champion_inputs, register_evaluated_model
from nemoforge.stages.result import StageResult

OutputRef = Callable[[Recipe, str, StageResult, dict[str, Ref]], Ref]
"""``(recipe, run_name, result, inputs) -> ref``: what a stage's task hands downstream once the stage ran."""


def _model_output(recipe: Recipe, run_name: str, result: StageResult, inputs: dict[str, Ref]) -> Ref:
    return model_ref(result)


def _serve_output(recipe: Recipe, run_name: str, result: StageResult, inputs: dict[str, Ref]) -> Ref:
    ttft = {k: v for k, v in result.metrics.items() if k.startswith("ttft")}
    return {"uri": result.outputs["responses"], **ttft}


@dataclass(frozen=True)
class StageEntry:
    """One stage as the runner sees it.

    Attributes:
        name: the stage's one name (package ``stages/<name>``, recipe section, MLflow run, artifact prefix).
        module: the module whose ``run(recipe, *, <input>_uri..., output_uri, store)`` runs the stage.
        trains: it trains with :func:`nemoforge.training.loop.train`: its ``run()`` takes ``on_log``, which
            :func:`nemoforge.runner.execute.execute_stage` wires to the stage's MLflow run, so the loss, the
            reward and tokens/s reach MLflow while it trains (and stay there when the stage is killed).
        reads_reasoning_data: its key also covers ``data`` (``data.sft_uri``, ``data.math_eval_uri``,
            ``data.preference_uri``, ...), the seed and sft's section (the held-out split it re-derives).
        output: what its task outputs (default: the model reference; eval registers the model first).
        context: keyword arguments of its ``run()`` that the runner looks up when the stage runs (eval: the
            current champion, from the MLflow registry), so the stage itself stays free of MLflow.
    """

    name: str
    module: str
    trains: bool = False
    reads_reasoning_data: bool = False
    output: OutputRef = _model_output
    context: Callable[[Recipe], dict[str, Any]] | None = None

    def run_fn(self) -> Callable[..., StageResult]:
        """The stage's ``run()`` (its module is imported now)."""
        return importlib.import_module(self.module).run

    def key_section(self, recipe: Recipe) -> Any:
        """What the stage's key covers from the recipe: its section (see ``reads_reasoning_data``)."""
        section = getattr(recipe, self.name)
        if not self.reads_reasoning_data:
            return section
        return {
            self.name: section.model_dump(mode="json"),
            "data": recipe.data.model_dump(mode="json"),
            "seed": recipe.seed,
            "sft": recipe.sft.model_dump(mode="json"),
        }


STAGE_TABLE: dict[str, StageEntry] = {
    entry.name: entry
    for entry in (
        StageEntry("nas", "nemoforge.stages.nas"),
        StageEntry("distill", "nemoforge.stages.distill", trains=True),
        StageEntry("cpt", "nemoforge.stages.cpt", trains=True),
        StageEntry("sft", "nemoforge.stages.sft", trains=True, reads_reasoning_data=True),
        StageEntry("rl", "nemoforge.stages.rl", trains=True, reads_reasoning_data=True),
        StageEntry(
            "eval", "nemoforge.stages.eval", reads_reasoning_data=True, output=register_evaluated_model,
            context=champion_inputs,
        ),
        StageEntry("serve", "nemoforge.stages.serve", output=_serve_output),
    )
}


def stage_entry(stage: str) -> StageEntry:
    """The table's entry for ``stage``.

    Raises:
        ValueError: no stage of that name.
    """
    try:
        return STAGE_TABLE[stage]
    except KeyError:
        raise ValueError(f"unknown stage {stage!r}") from None


def stage_key(recipe: Recipe, stage: str, inputs: dict[str, Ref]) -> str:
    """The stage's step key: its :meth:`StageEntry.key_section` and its inputs' digests."""
    return step_key(stage, stage_entry(stage).key_section(recipe), inputs)
