"""The DeepSpeed config of a training stage, built in one place (no torch import: the TrainJob builder uses it).

:func:`deepspeed_config` builds it from the recipe: ZeRO stage and buckets, bf16, and the split of the
stage's ``batch_size`` into micro-batches over the ranks. It has no ``optimizer`` or ``scheduler`` section:
the training loop hands DeepSpeed its own AdamW and LR schedule
(:func:`~nemoforge.training.engines.build_optimizer`), so the update rule and the checkpointed optimizer
state are those of the single-process loop. :func:`~nemoforge.cluster.trainjob.build_trainjob` puts it in
the workers' ``$NEMOFORGE_DEEPSPEED_CONFIG``; :func:`deepspeed_config_for` is what the DeepSpeed engine
runs with.
"""

from __future__ import annotations

import json
import os
from typing import Any

from nemoforge.config import StageResources, TrainConfig
from nemoforge.config.resources import split_batch
from nemoforge.errors import RecipeError

DEEPSPEED_CONFIG_ENV = "NEMOFORGE_DEEPSPEED_CONFIG"
"""The DeepSpeed config as JSON text (set on TrainJob workers by the launcher)."""


def micro_batch_size(batch_size: int, world_size: int, accumulation: int) -> int:
    """Sequences per rank per micro-batch (:func:`nemoforge.config.resources.split_batch`, which recipes are validated with).

    Raises:
        RecipeError: the batch does not split into whole micro-batches (names a multiple that does).
    """
    try:
        return split_batch(batch_size, world_size, accumulation)
    except ValueError as err:
        raise RecipeError(str(err)) from None


def deepspeed_config(train: TrainConfig, res: StageResources) -> dict[str, Any]:
    """The DeepSpeed config of a stage: ZeRO stage, bf16 and the batch split, from the recipe.

    ``train_batch_size`` is the stage's ``batch_size`` (sequences per optimizer step), split into
    ``gradient_accumulation_steps`` micro-batches on each of ``num_nodes * gpu_count`` ranks. No
    ``optimizer``/``scheduler`` section: the loop's AdamW (torch's, no DeepSpeed op is compiled in the image)
    and warmup + cosine schedule are handed to ``deepspeed.initialize``.

    Raises:
        RecipeError: the batch does not split into whole micro-batches.
    """
    ds = res.deepspeed
    world_size = res.num_nodes * max(res.gpu_count, 1)
    zero: dict[str, Any] = {
        "stage": ds.zero_stage,
        "overlap_comm": ds.overlap_comm,
        "contiguous_gradients": True,
        "reduce_scatter": True,
        "reduce_bucket_size": ds.reduce_bucket_size_elements,
    }
    if ds.zero_stage == 3:
        zero |= {
            "stage3_prefetch_bucket_size": ds.stage3_prefetch_bucket_size_elements,
            "stage3_gather_16bit_weights_on_model_save": True,
        }
    return {
        "train_batch_size": train.batch_size,
        "train_micro_batch_size_per_gpu": micro_batch_size(
            train.batch_size, world_size, ds.gradient_accumulation_steps
        ),
        "gradient_accumulation_steps": ds.gradient_accumulation_steps,
        "gradient_clipping": train.grad_clip_norm,
        "bf16": {"enabled": ds.bf16},
        "zero_optimization": zero,
        "steps_per_print": train.log_every_steps,
    }


def deepspeed_config_for(cfg: TrainConfig, world_size: int) -> dict[str, Any]:
    """The config the DeepSpeed engine runs with: ``$NEMOFORGE_DEEPSPEED_CONFIG``, else the stage default.

    The default is :func:`deepspeed_config` of the stage with one node of ``world_size`` GPUs (ZeRO-3, bf16,
    no CPU offload). The batch split and ``gradient_clipping`` always follow ``cfg``.

    Raises:
        RecipeError: the config has an ``optimizer`` or ``scheduler`` section (the loop's own are used), its
            ``train_batch_size`` differs from ``cfg.batch_size``, or the batch does not split into
            ``world_size`` ranks x ``gradient_accumulation_steps`` whole micro-batches.
    """
    text = os.environ.get(DEEPSPEED_CONFIG_ENV)
    config = json.loads(text) if text else deepspeed_config(cfg, StageResources(num_nodes=1, gpu_count=world_size))
    if sections := [k for k in ("optimizer", "scheduler") if k in config]:
        raise RecipeError(
            f"{DEEPSPEED_CONFIG_ENV}: {' and '.join(sections)} given, but the training loop hands DeepSpeed its own "
            "AdamW and LR schedule from the recipe: remove them (regenerate the config from the recipe)"
        )
    if config.get("train_batch_size", cfg.batch_size) != cfg.batch_size:
        raise RecipeError(
            f"{DEEPSPEED_CONFIG_ENV}: train_batch_size={config['train_batch_size']} but the stage's "
            f"batch_size={cfg.batch_size}: regenerate the config from the recipe"
        )
    accumulation = int(config.get("gradient_accumulation_steps", 1))
    return config | {
        "train_batch_size": cfg.batch_size,
        "gradient_accumulation_steps": accumulation,
        "train_micro_batch_size_per_gpu": micro_batch_size(cfg.batch_size, world_size, accumulation),
        "gradient_clipping": cfg.grad_clip_norm,
    }
