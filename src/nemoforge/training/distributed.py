"""The torchrun job: joining it, this process's rank, rank-sharded batches and the collectives the loop uses.

Shape legend: ``B`` sequences per optimizer step over all ranks (``TrainConfig.batch_size``), ``b = B / N``
sequences per rank (``N`` = ``WORLD_SIZE``), ``T`` tokens per sequence.

Update ``i`` takes the same deterministic batch ``batches(i)`` on every rank and rank ``r`` trains on its rows
``r*b .. r*b + b - 1`` (:func:`rank_rows`); with gradients averaged over ranks and losses that are means over
equal-length rows, an update at any ``N`` equals the single-process update on the whole batch (up to float
rounding), so the global batch and the data order do not depend on ``N``. The engines that train on ``N``
ranks (DDP, DeepSpeed ZeRO) are in :mod:`nemoforge.training.engines`; :data:`ENGINE_ENV` picks one.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from nemoforge.errors import NemoforgeError

ENGINE_ENV = "NEMOFORGE_DISTRIBUTED_ENGINE"
"""``auto`` (default: DeepSpeed when importable and CUDA is present, else DDP), ``ddp`` or ``deepspeed``."""


@dataclass(frozen=True)
class DistContext:
    """This process's place in the torchrun job.

    Attributes:
        rank: global rank, 0 .. world_size - 1.
        world_size: ``N``, processes in the job.
        local_rank: rank on this node (the CUDA device index).
        backend: ``nccl`` (CUDA) or ``gloo`` (CPU).
    """

    rank: int
    world_size: int
    local_rank: int
    backend: str

    @property
    def is_main(self) -> bool:
        """True on rank 0, the rank that writes checkpoints, logs and uploads."""
        return self.rank == 0


def world_size() -> int:
    """``N`` from torchrun's ``WORLD_SIZE`` (1 when not launched by torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_from_env() -> DistContext | None:
    """Join the torchrun job (``env://``): nccl on CUDA (device ``LOCAL_RANK``), gloo on CPU; idempotent.

    Returns:
        The context, or None when ``WORLD_SIZE`` is 1 (single process: nothing is initialized).
    """
    if world_size() <= 1:
        return None
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)  # before any CUDA tensor: "cuda" is now this rank's GPU
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, dist.get_backend())


def is_main_process() -> bool:
    """True on rank 0 of a torchrun job and in a single process."""
    return not dist.is_initialized() or dist.get_rank() == 0


def rank() -> int:
    """This process's global rank (0 in a single process)."""
    return dist.get_rank() if dist.is_initialized() else 0


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    """Leave the process group (no-op when none was joined); a rank calls it once it has no collective left."""
    if dist.is_initialized():
        dist.destroy_process_group()


def broadcast_from_main(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (picklable; a single process returns ``obj``)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def rank_rows(input_ids_BT: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Rank ``ctx.rank``'s slice of the global batch: rows ``r*b .. r*b + b - 1`` of ``input_ids_BT``.

    Returns:
        ``input_ids_bT`` with ``b = B / N``.

    Raises:
        NemoforgeError: ``B`` is not a multiple of ``N``.
    """
    num_rows = input_ids_BT.shape[0]
    if num_rows % ctx.world_size:
        raise NemoforgeError(
            f"batch_size={num_rows} does not split over {ctx.world_size} ranks: use a multiple of {ctx.world_size}"
        )
    b = num_rows // ctx.world_size
    return input_ids_BT[ctx.rank * b : (ctx.rank + 1) * b]


def mean_over_ranks(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """The mean of each value over all ranks (one all-reduce; identical on every rank)."""
    if not values:
        return {}
    # nccl reduces CUDA tensors only; gloo CPU ones
    buf = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    dist.all_reduce(buf)
    return dict(zip(values, (buf / dist.get_world_size()).tolist(), strict=True))


def mean_over_job(value: float) -> float:
    """``value`` averaged over the ranks of the joined job (one all-reduce, identical on every rank); ``value``
    itself when no process group is joined. A collective: every rank calls it at the same point."""
    if not dist.is_initialized():
        return value
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    return mean_over_ranks({"value": value}, device)["value"]


def engine_kind() -> str:
    """``deepspeed`` or ``ddp``, from ``$NEMOFORGE_DISTRIBUTED_ENGINE`` (see :data:`ENGINE_ENV`).

    Raises:
        NemoforgeError: an unknown value, or ``deepspeed`` asked for where it is not installed.
    """
    choice = os.environ.get(ENGINE_ENV, "auto")
    has_deepspeed = importlib.util.find_spec("deepspeed") is not None
    if choice == "auto":
        return "deepspeed" if has_deepspeed and torch.cuda.is_available() else "ddp"
    if choice not in ("ddp", "deepspeed"):
        raise NemoforgeError(f"{ENGINE_ENV}={choice!r}: use auto, ddp or deepspeed")
    if choice == "deepspeed" and not has_deepspeed:
        raise NemoforgeError(f"{ENGINE_ENV}=deepspeed but deepspeed is not installed (the train image has it)")
    return choice
