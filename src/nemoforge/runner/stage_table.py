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
"""``(recipe, run_name, result, inputs) -> ref``: the main reference a stage's task hands downstream once it ran."""


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
        reads_data: the ``data`` fields its ``run()`` reads from the recipe (its key covers them); what it
            reads from an upstream step (the corpus, sft's split) its key covers through that input's digest.
        output: its task's main reference (default: the model reference; eval registers the model first).
        output_name: the name of that reference among the task's outputs (:meth:`output_refs`).
        handoffs: further outputs of its result that its task hands downstream as ``{"uri", "digest"}`` (sft:
            ``data``, the split rl and eval read).
        context: keyword arguments of its ``run()`` that the runner looks up when the stage runs (eval: the
            current champion, from the MLflow registry), so the stage itself stays free of MLflow.
    """

    name: str
    module: str
    trains: bool = False
    reads_data: tuple[str, ...] = ()
    output: OutputRef = _model_output
    output_name: str = "model"
    handoffs: tuple[str, ...] = ()
    context: Callable[[Recipe], dict[str, Any]] | None = None

    def run_fn(self) -> Callable[..., StageResult]:
        """The stage's ``run()`` (its module is imported now)."""
        return importlib.import_module(self.module).run

    def key_section(self, recipe: Recipe) -> dict[str, Any]:
        """What the stage's key covers from the recipe: its section, ``seed`` and ``dtype``, and ``reads_data``."""
        return {
            self.name: getattr(recipe, self.name).model_dump(mode="json"),
            "seed": recipe.seed,
            "dtype": recipe.dtype,
            "data": recipe.data.model_dump(mode="json", include=set(self.reads_data)),
        }

    def output_refs(self, recipe: Recipe, run_name: str, result: StageResult, inputs: dict[str, Ref]) -> dict[str, Ref]:
        """What the stage's task outputs, by name: ``output`` under ``output_name``, then each of ``handoffs``."""
        refs = {self.output_name: self.output(recipe, run_name, result, inputs)}
        return refs | {name: {"uri": result.outputs[name], "digest": result.digests[name]} for name in self.handoffs}


STAGE_TABLE: dict[str, StageEntry] = {
    entry.name: entry
    for entry in (
        StageEntry("nas", "nemoforge.stages.nas"),
        StageEntry("distill", "nemoforge.stages.distill", trains=True),
        StageEntry("cpt", "nemoforge.stages.cpt", trains=True),
        StageEntry("sft", "nemoforge.stages.sft", trains=True, reads_data=("sft_uri", "arithmetic"), handoffs=("data",)),
        StageEntry("rl", "nemoforge.stages.rl", trains=True, reads_data=("math_eval_uri", "preference_uri")),
        StageEntry(
            "eval", "nemoforge.stages.eval", reads_data=("math_eval_uri", "ifeval_uri"), output=register_evaluated_model,
            context=champion_inputs,
        ),
        StageEntry("serve", "nemoforge.stages.serve", output=_serve_output, output_name="responses"),
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
