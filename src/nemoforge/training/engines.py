"""Training engines: how the one loop's model and optimizer run on this process (single, DDP, DeepSpeed ZeRO).

Shape legend: ``B`` sequences per optimizer step over all ranks, ``b = B / N`` sequences on this rank.

:func:`~nemoforge.training.loop.parallelize` applies an engine from outside the model, as torchtitan's
``parallelize`` does: the model stays single-device code, and :func:`~nemoforge.training.loop.train` only talks
to the :class:`Engine` it returns. An engine owns the optimizer and LR schedule, the forward through its wrapper, backward, step,
and saving/loading the checkpoint; the loop owns the data, the metric window, logging, the checkpoint
cadence, resume and progress. Every engine steps the same AdamW and schedule
(:func:`~nemoforge.training.optim.build_optimizer`) and writes the same consolidated single-process checkpoint
(:mod:`~nemoforge.training.checkpoint`), so a run resumes on any engine and any number of ranks.

* :class:`TorchEngine`: one process (``WORLD_SIZE`` 1).
* :class:`DDPEngine`: torch DDP under torchrun (CPU/gloo, or CUDA without deepspeed).
* :class:`~nemoforge.training.zero.DeepSpeedEngine`: DeepSpeed ZeRO under torchrun when ``deepspeed`` is
  importable and CUDA is present (the TrainJob image), with the config of
  :func:`~nemoforge.training.deepspeed_config.deepspeed_config_for`.

``NEMOFORGE_DISTRIBUTED_ENGINE=ddp|deepspeed`` forces one under torchrun (tests run DeepSpeed on CPU with gloo
this way). Only rank 0 writes checkpoints; every rank resumes from its own ``checkpoint_dir`` (on a cluster
each pod fetches the checkpoint from the store), and all must find the same step as rank 0.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from nemoforge.config import TrainConfig
from nemoforge.errors import NemoforgeError
from nemoforge.training.checkpoint import (
    TrainState,
    checkpoint_step,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from nemoforge.training.distributed import (
    DistContext,
    broadcast_from_main,
    mean_over_ranks,
    rank_rows,
)
from nemoforge.training.optim import build_optimizer

LossFn = Callable[[torch.nn.Module, torch.Tensor], tuple[torch.Tensor, dict[str, float]]]
"""``loss_fn(model, input_ids_BT) -> (scalar loss to minimize, extra metrics to log, e.g. loss parts)``."""


class LossModule(torch.nn.Module):
    """The loss as a module: ``forward(input_ids_bT) = loss_fn(model, input_ids_bT)``.

    Engines wrap this instead of the model, so a loss function may use any part of the plain model
    (``model.base_model``, ``model.get_output_embeddings().weight``) and its gradients still go through the
    engine's hooks.
    """

    def __init__(self, model: torch.nn.Module, loss_fn: LossFn):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, input_ids_bT: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        return self.loss_fn(self.model, input_ids_bT)


class Engine:
    """What the loop asks of an engine. This base class holds the parts that depend only on the ranks.

    Attributes:
        model: the plain model (trained in place; holds the trained weights after :meth:`finish`).
        cfg: the stage's training section.
        device: the training device (the model's).
        ctx: this process's place in the torchrun job; None in a single process.
        wrapped: the :class:`LossModule` as the engine wraps it; ``wrapped(input_ids_bT) -> (loss, extra)``.
        micro_batches: micro-batches per update on each rank (DeepSpeed's ``gradient_accumulation_steps``).
        forces_activation_checkpointing: the engine trains with activation checkpointing on.
    """

    micro_batches: int = 1
    forces_activation_checkpointing: bool = False

    def __init__(self, model: torch.nn.Module, cfg: TrainConfig, device: torch.device, ctx: DistContext | None):
        self.model = model
        self.cfg = cfg
        self.device = device
        self.ctx = ctx
        self.wrapped: torch.nn.Module
        # nccl reduces CUDA tensors only; gloo CPU ones
        self._reduce_device = device if ctx is not None and ctx.backend == "nccl" else torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """True on rank 0 (and in a single process): the rank that writes checkpoints, logs and shows progress."""
        return self.ctx is None or self.ctx.is_main

    @property
    def world_size(self) -> int:
        """``N``, the ranks that share each update (1 in a single process)."""
        return 1 if self.ctx is None else self.ctx.world_size

    def local_rows(self, input_ids_BT: torch.Tensor) -> torch.Tensor:
        """This rank's rows of the global batch (:func:`~nemoforge.training.distributed.rank_rows`)."""
        return input_ids_BT if self.ctx is None else rank_rows(input_ids_BT, self.ctx)

    def mean_over_ranks(self, values: dict[str, float]) -> dict[str, float]:
        """Each value averaged over the ranks (a collective; the values themselves in a single process)."""
        return values if self.ctx is None else mean_over_ranks(values, self._reduce_device)

    def resume_point(self, checkpoint_dir: Path) -> Path | None:
        """The newest complete checkpoint in ``checkpoint_dir``, the same step on every rank (None: start fresh).

        Raises:
            NemoforgeError: this rank's newest checkpoint is not rank 0's.
        """
        latest = latest_checkpoint(checkpoint_dir)
        if self.ctx is None:
            return latest
        main_step = broadcast_from_main(checkpoint_step(latest))
        if checkpoint_step(latest) != main_step:
            raise NemoforgeError(
                f"rank {self.ctx.rank}: newest checkpoint in {checkpoint_dir} is step {checkpoint_step(latest)}, "
                f"rank 0 resumes from step {main_step}: every rank needs the same checkpoint (fetch it from the "
                "store first)"
            )
        return latest

    def barrier(self) -> None:
        """Wait for every rank (no-op in a single process)."""
        if self.ctx is not None:
            dist.barrier()

    def lr(self) -> float:
        """The LR of the next update."""
        raise NotImplementedError

    def backward(self, loss: torch.Tensor) -> None:
        """Gradients of one micro-batch's ``loss`` (averaged over the ranks by the engine)."""
        raise NotImplementedError

    def step(self) -> torch.Tensor | float:
        """After a micro-batch's backward: at the update's end, clip to ``cfg.grad_clip_norm``, step the optimizer
        and the LR schedule. Returns the total gradient norm before clipping (a tensor may be unsynchronized)."""
        raise NotImplementedError

    def save(self, checkpoint_dir: Path, state: TrainState) -> Path | None:
        """Write the checkpoint of ``state`` (a collective where the state is sharded); its path on rank 0, else None."""
        raise NotImplementedError

    def load(self, path: Path) -> TrainState:
        """Restore the model, optimizer, schedule and RNG from the checkpoint at ``path``."""
        raise NotImplementedError

    def finish(self) -> None:
        """After the last update: leave the trained weights in :attr:`model` on every rank."""


class TorchEngine(Engine):
    """Plain torch: this process holds the whole model and the AdamW state (so its checkpoint is the full state)."""

    def __init__(
        self,
        model: torch.nn.Module,
        loss_fn: LossFn,
        cfg: TrainConfig,
        device: torch.device,
        ctx: DistContext | None = None,
    ):
        super().__init__(model, cfg, device, ctx)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer, self.scheduler = build_optimizer(self.params, cfg, device)
        self.wrapped = LossModule(model, loss_fn)

    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def backward(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()

    def step(self) -> torch.Tensor:
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip_norm)
        self.optimizer.step()
        self.scheduler.step()
        return grad_norm

    def save(self, checkpoint_dir: Path, state: TrainState) -> Path | None:
        if not self.is_main:
            return None
        return save_checkpoint(
            checkpoint_dir, state, self.model, self.optimizer, self.scheduler, keep=self.cfg.keep_checkpoints
        )

    def load(self, path: Path) -> TrainState:
        return load_checkpoint(path, self.model, self.optimizer, self.scheduler)


class DDPEngine(TorchEngine):
    """torch DDP: every rank holds the whole model and optimizer; the backward pass averages the gradients."""

    def __init__(
        self, model: torch.nn.Module, loss_fn: LossFn, cfg: TrainConfig, device: torch.device, ctx: DistContext
    ):
        super().__init__(model, loss_fn, cfg, device, ctx)
        device_ids = [device.index] if device.type == "cuda" else None
        # construction broadcasts rank 0's parameters, so every replica starts from the same weights
        self.wrapped = torch.nn.parallel.DistributedDataParallel(self.wrapped, device_ids=device_ids)

