"""The root of the recipe: :class:`Recipe`, its sections, and the rules that span sections (TrainJob batch
splits, serve and eval GPUs, the data rl and eval need, no credentials in URIs)."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, model_validator

from nemoforge.config.base import STAGES, _Section
from nemoforge.config.inputs import DataConfig, ModelConfig, ParentArchitecture
from nemoforge.config.resources import DATA_PARALLEL_STAGES, ResourcesConfig, split_batch
from nemoforge.config.stages import (
    CPTConfig,
    DistillConfig,
    EvalConfig,
    NASConfig,
    RLConfig,
    ServeConfig,
    SFTConfig,
)
from nemoforge.config.stores import StorageConfig, TrackingConfig
from nemoforge.planning import EvalPlan, check_tensor_parallel, plan_eval

_URI_USERINFO = re.compile(r"^[a-z][a-z0-9+.-]*://[^/?#]*@", re.IGNORECASE)
"""``scheme://user[:password]@host``: credentials inside a URI."""


def _fields_with_credentials(tree: Any, path: str = "") -> list[str]:
    """The field paths of ``tree`` (a recipe dump) whose value is a URI with credentials in it."""
    if isinstance(tree, dict):
        return [f for key, value in tree.items() for f in _fields_with_credentials(value, f"{path}{key}.")]
    if isinstance(tree, list):
        return [f for i, value in enumerate(tree) for f in _fields_with_credentials(value, f"{path}{i}.")]
    return [path.rstrip(".")] if isinstance(tree, str) and _URI_USERINFO.match(tree) else []


class Recipe(_Section):
    """One pipeline run's whole configuration: ``{model, data, nas, distill, cpt, sft, rl, eval, resources, ...}``."""

    name: str = Field(..., pattern=r"^[a-z0-9][a-z0-9.-]*$", description="Recipe name (lowercase, dashes).")
    description: str = ""
    seed: int = Field(
        0,
        description="The run's one seed: every random stream of every step (data generation, splits, batch order, "
        "sampling, bootstrap) is derived from it by name (nemoforge.runtime.seed_for).",
    )
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="Training and inference dtype.")
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    nas: NASConfig = NASConfig()
    distill: DistillConfig = DistillConfig()
    cpt: CPTConfig = CPTConfig()
    sft: SFTConfig = SFTConfig()
    rl: RLConfig = RLConfig()
    eval: EvalConfig = EvalConfig()
    serve: ServeConfig = ServeConfig()
    resources: ResourcesConfig = ResourcesConfig()
    tracking: TrackingConfig = TrackingConfig()
    storage: StorageConfig = StorageConfig()

    @model_validator(mode="after")
    def _check_trainjob_batches(self) -> Recipe:
        for stage in DATA_PARALLEL_STAGES:
            res = getattr(self.resources, stage)
            if res.runs_as_trainjob:
                world_size = res.num_nodes * max(res.gpu_count, 1)
                # rl's preference pass trains on the same ranks with the same accumulation
                sections = {stage: getattr(self, stage)}
                if stage == "rl" and self.rl.preference.enabled:
                    sections["rl.preference"] = self.rl.preference
                for field, section in sections.items():
                    try:
                        split_batch(section.batch_size, world_size, res.deepspeed.gradient_accumulation_steps)
                    except ValueError as err:
                        raise ValueError(
                            f"{field}.{err} (resources.{stage}: {res.num_nodes} nodes x {max(res.gpu_count, 1)} GPUs, "
                            f"deepspeed.gradient_accumulation_steps={res.deepspeed.gradient_accumulation_steps})"
                        ) from None
                if stage == "rl" and world_size > 1 and self.rl.rollout_engine == "vllm":
                    raise ValueError(
                        f"rl.rollout_engine=vllm runs in one process, not on the {world_size} torchrun ranks of "
                        "resources.rl: set rl.rollout_engine=generate (or auto, which picks generate there)"
                    )
        return self

    @model_validator(mode="after")
    def _check_serve_gpus(self) -> Recipe:
        res = self.resources.serve
        if res.num_nodes > 1 or res.launch == "trainjob":
            raise ValueError(f"resources.serve.num_nodes={res.num_nodes}, launch={res.launch}: serve runs in one pod; "
                             "set num_nodes=1 and launch=auto")
        if res.gpu_count > self.serve.tensor_parallel_size:
            raise ValueError(
                f"resources.serve.gpu_count={res.gpu_count}: vLLM shards the model over serve.tensor_parallel_size="
                f"{self.serve.tensor_parallel_size} GPUs; set gpu_count={self.serve.tensor_parallel_size} or raise "
                "serve.tensor_parallel_size"
            )
        if res.gpu_count and res.gpu_count % self.serve.tensor_parallel_size:
            raise ValueError(
                f"serve.tensor_parallel_size={self.serve.tensor_parallel_size} does not divide resources.serve."
                f"gpu_count={res.gpu_count}: vLLM needs one GPU per rank; set serve.tensor_parallel_size="
                f"{res.gpu_count} or gpu_count={self.serve.tensor_parallel_size}"
            )
        return self

    @model_validator(mode="after")
    def _check_tensor_parallel(self) -> Recipe:
        # issue 13, bad input: with the parent's shape stated, before anything runs; else the preflight does it
        if self.model.parent.architecture is not None:
            self.check_parallel_plan(self.model.parent.architecture, "model.parent.architecture")
        return self

    def eval_plan(self, arch: ParentArchitecture) -> EvalPlan | None:
        """The GPUs eval needs on ``resources.eval``'s GPUs (:func:`~nemoforge.planning.plan_eval`); None when eval
        is off or runs on the CPU, or the memory of its GPU is unknown (see ``resources.eval.gpu_memory_gib``)."""
        res = self.resources.eval
        gpu_memory = res.gpu_memory_bytes()
        if not self.eval.enabled or not res.gpu_count or gpu_memory is None:
            return None
        return plan_eval(self, arch, gpu_memory)

    def check_parallel_plan(self, arch: ParentArchitecture, where: str) -> None:
        """Check the tensor-parallel sizes (``serve.tensor_parallel_size``; eval's, ``resources.eval.gpu_count``)
        against the model's heads, and eval's GPUs against :meth:`eval_plan`.

        Args:
            where: where ``arch`` came from, named in the message.

        Raises:
            ValueError: one line naming the field and the fix.
        """
        check_tensor_parallel("serve.tensor_parallel_size", self.serve.tensor_parallel_size, arch, where)
        res = self.resources.eval
        if not (self.eval.enabled and res.gpu_count):
            return
        check_tensor_parallel("resources.eval.gpu_count", res.gpu_count, arch, where)
        plan = self.eval_plan(arch)
        if plan is not None and plan.num_gpus == 0:
            raise ValueError(
                f"resources.eval.gpu_count={res.gpu_count}: eval does not fit even on the largest tensor-parallel "
                f"size ({plan.breakdown()}); lower eval.batch_size or eval.max_new_tokens"
            )
        if plan is not None and res.gpu_count < plan.num_gpus:
            raise ValueError(
                f"resources.eval.gpu_count={res.gpu_count} is below the {plan.num_gpus} GPUs eval needs "
                f"({plan.breakdown()}, {where}); set resources.eval.gpu_count={plan.num_gpus}"
            )

    @model_validator(mode="after")
    def _check_preference_data(self) -> Recipe:
        if self.rl.enabled and self.rl.preference.enabled and self.data.preference_uri is None:
            raise ValueError(
                "rl.preference.enabled needs data.preference_uri (JSONL with prompt/chosen/rejected): set it, or "
                "set rl.preference.enabled=false"
            )
        return self

    @model_validator(mode="after")
    def _check_sft_handoff(self) -> Recipe:
        # rl and eval read sft's data split (nemoforge.data.sft_split) as they read its model
        if self.rl.enabled and not self.sft.enabled:
            raise ValueError(
                "rl.enabled needs sft.enabled: rl keeps its prompts apart from sft's data and draws them from sft's "
                "source (sft's data output); enable sft, or set rl.enabled=false"
            )
        if self.eval.enabled and not self.sft.enabled and self.data.math_eval_uri is None:
            raise ValueError(
                "eval.enabled without sft needs data.math_eval_uri (JSONL of math problems): eval grades sft's "
                "held-out split otherwise; set data.math_eval_uri, or enable sft"
            )
        return self

    @model_validator(mode="after")
    def _check_no_credentials(self) -> Recipe:
        # The recipe is logged to MLflow (recipe.json, params), printed in every task log and compiled into
        # the pipeline YAML and TrainJob manifests: a secret in it would land in all of them.
        found = _fields_with_credentials(self.model_dump(mode="json"))
        if found:
            raise ValueError(
                f"{', '.join(found)}: credentials in a URI (user:password@host) would be logged and compiled into "
                "manifests: remove them and give them through the environment from a Kubernetes "
                "Secret (MLFLOW_TRACKING_TOKEN or MLFLOW_TRACKING_USERNAME/_PASSWORD; AWS_ACCESS_KEY_ID/"
                "AWS_SECRET_ACCESS_KEY)"
            )
        return self

    def enabled_stages(self) -> list[str]:
        return [s for s in STAGES if getattr(self, s).enabled]

    def to_json(self) -> str:
        return self.model_dump_json()

