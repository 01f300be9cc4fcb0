"""What every recipe section shares: the frozen base model that forbids unknown keys, the stage names in
pipeline order, and the reasoning-toggle mode."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict


def _on_off(value: Any) -> Any:
    """YAML 1.1 (PyYAML) reads a bare ``on``/``off`` as a boolean: take it back as the reasoning mode."""
    return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value


ReasoningMode = Annotated[Literal["on", "off"], BeforeValidator(_on_off)]
"""A reasoning-toggle mode, "detailed thinking on|off"; a YAML ``on``/``off`` (read as a boolean) is accepted."""

STAGES = ("nas", "distill", "cpt", "sft", "rl", "eval", "serve")
"""Pipeline stages in order; one name per stage everywhere (package, component, task, MLflow run)."""
PREPARATION_STEPS = ("check-inputs", "parent", "corpus")
"""The pipeline's tasks before the stages, in order: each is a KFP task and an MLflow run of that name under the
pipeline run, so ``nemoforge status`` lists them above the stages."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

