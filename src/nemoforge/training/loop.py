"""The one training loop of distill, cpt, sft and rl: AdamW, warmup + cosine LR, clipping, checkpoint/resume.

Shape legend: ``B`` sequences per step (``TrainConfig.batch_size``), ``T`` tokens per sequence.

Steps count from 1: "step N" is the state after N optimizer updates, and ``step-N/`` its checkpoint
(:mod:`~nemoforge.training.checkpoint`: complete or absent, pickle-free). ``batches(i)`` gives the batch of
update ``i`` (0-based) as a pure function of ``i``, so a resumed run sees exactly the data an uninterrupted run
would have seen. On start, :func:`train` resumes from the newest complete checkpoint under ``checkpoint_dir``;
resuming gives the same parameters as an uninterrupted run.

The loop is the same on every engine (:func:`parallelize`: a single process, or
DDP or DeepSpeed ZeRO on the ``N`` ranks of a torchrun job, same batches, same checkpoint layout, any ``N``).
It owns the data, the metric window, logging, the checkpoint cadence, resume and progress; the engine owns
the model's wrapper, the optimizer, backward, step, and the checkpoint's contents.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm.auto import tqdm

from nemoforge.config import TrainConfig
from nemoforge.errors import NemoforgeError
from nemoforge.runtime import no_progress
from nemoforge.training import flops
from nemoforge.training.checkpoint import TrainState, announce_resume
from nemoforge.training.distributed import engine_kind, init_from_env
from nemoforge.training.engines import DDPEngine, Engine, LossFn, TorchEngine
from nemoforge.training.perf import training_features
from nemoforge.training.zero import DeepSpeedEngine

__all__ = ["BatchFn", "LogFn", "LossFn", "TrainState", "epoch_batches", "parallelize", "train", "train_step", "uses_bf16_autocast"]

BatchFn = Callable[[int], torch.Tensor]
"""``batches(i) -> input_ids_BT`` (LongTensor) for 0-based update ``i``; deterministic in ``i``."""

LogFn = Callable[[int, dict[str, float]], None]
"""``on_log(step, metrics)``: where a stage's live metrics go (the runner wires it to the stage's MLflow run)."""


def epoch_batches(ids_NT: torch.Tensor, batch_size: int, *, seed: int) -> BatchFn:
    """A :data:`BatchFn` over the rows of ``ids_NT``: shuffled epochs, a fresh seeded order each epoch.

    Update ``i`` takes rows ``i*B .. i*B + B - 1`` of the endless stream "epoch 0's permutation, then
    epoch 1's, ...", where epoch ``e``'s permutation is drawn from a generator seeded with ``seed + e``.

    Args:
        ids_NT: LongTensor rows (``N >= 1``).
        batch_size: ``B``.
        seed: base seed of the per-epoch permutations.

    Returns:
        ``batches(i) -> input_ids_BT``.
    """
    num_rows = ids_NT.shape[0]
    if num_rows < 1:
        raise ValueError("epoch_batches: no rows")

    @functools.lru_cache(maxsize=4)
    def order(epoch: int) -> list[int]:
        return torch.randperm(num_rows, generator=torch.Generator().manual_seed(seed + epoch)).tolist()

    def batches(i: int) -> torch.Tensor:
        flat = range(i * batch_size, (i + 1) * batch_size)
        return ids_NT[[order(k // num_rows)[k % num_rows] for k in flat]]

    return batches


def train(
    model: torch.nn.Module,
    loss_fn: LossFn,
    batches: BatchFn,
    cfg: TrainConfig,
    *,
    seed: int,
    checkpoint_dir: Path,
    desc: str,
    on_log: LogFn | None = None,
    on_checkpoint: Callable[[Path], None] | None = None,
    flops_per_token: float | None = None,
    peak_flops_per_s: float | None = None,
) -> TrainState:
    """Train ``model`` for ``cfg.steps`` updates, resuming from the newest checkpoint in ``checkpoint_dir``.

    AdamW (fused on CUDA; weight decay on matrices only) over the parameters that require grad; LR by
    :func:`~nemoforge.training.optim.lr_multiplier`; each update is :func:`train_step` (bf16 autocast per
    ``cfg.mixed_precision``: by default on CUDA, while the CPU runs in the model's dtype). The engine is
    :func:`parallelize`'s: under torchrun (``WORLD_SIZE > 1``) each rank trains its
    rows of every batch with DDP or DeepSpeed ZeRO and the result is the same on every rank. Activation
    checkpointing and per-layer ``torch.compile`` are on for the run when the config (or the engine) asks
    (:func:`~nemoforge.training.perf.training_features`). A checkpoint is written every
    ``cfg.checkpoint_every_steps`` updates and after the last one; of the local checkpoints, the newest
    ``cfg.keep_checkpoints`` are kept once a newer one is complete. Every ``cfg.log_every_steps`` updates,
    ``tokens_per_s`` (tokens of the global batches over the wall time of their steps, checkpoint writing
    excluded) and, given ``flops_per_token`` and a peak (``peak_flops_per_s`` or
    :func:`~nemoforge.training.flops.peak_flops_per_s`), ``mfu`` (per GPU: ``tokens_per_s / N``) are logged.
    Only rank 0 shows progress, writes checkpoints and calls ``on_log``/``on_checkpoint``; the others wait for
    each checkpoint at a barrier.

    Args:
        model: trained in place; its device is the training device.
        loss_fn: see :data:`~nemoforge.training.engines.LossFn`; called under autocast.
        batches: see :data:`BatchFn`; the global batch of every update, the same on every rank.
        cfg: the stage's training section (``recipe.distill`` / ``recipe.cpt`` / ...).
        seed: the torch RNG's seed at the start (dropout, and what a loss draws from it: rl's rollouts), the
            same on every rank (a stage's ``seed_for(recipe, "<stage>.train")``); a resumed run restores the
            checkpoint's RNG state instead.
        checkpoint_dir: local directory of ``step-N/`` checkpoints (created).
        desc: progress-bar label.
        on_log: called as ``on_log(step, metrics)`` every ``cfg.log_every_steps`` updates.
        on_checkpoint: called with each new complete checkpoint directory (e.g. to upload it).
        flops_per_token: model FLOPs of one trained token (forward + backward) for the logged MFU, from
            :func:`~nemoforge.training.flops.training_flops_per_token`; None: no MFU.
        peak_flops_per_s: one device's dense peak FLOP/s for the MFU (a recipe's ``peak_flops_per_s``); None:
            looked up for known GPUs (:func:`~nemoforge.training.flops.peak_flops_per_s`).

    Returns:
        The final :class:`~nemoforge.training.checkpoint.TrainState` (the same history on every rank); ``model``
        holds the trained weights on every rank.

    Raises:
        NemoforgeError: the loss became NaN or infinite (names the step; lower the LR); ``B`` does not split
            over the ranks; a rank's ``checkpoint_dir`` lacks the checkpoint rank 0 resumes from.
    """
    device = next(model.parameters()).device
    checkpoint_dir = Path(checkpoint_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)  # the same on every rank; a resumed run restores the saved state
    engine = parallelize(model, loss_fn, cfg, device)
    state = _resume(engine, checkpoint_dir, desc)

    model.train()
    peak = (peak_flops_per_s or flops.peak_flops_per_s(device)) if flops_per_token is not None else None
    window_tokens, window_s = 0, 0.0  # since the last log
    bar = tqdm(total=cfg.steps, initial=state.step, desc=desc, unit="step", disable=no_progress() or not engine.is_main)
    features = training_features(
        model,
        activation_checkpointing=cfg.activation_checkpointing or engine.forces_activation_checkpointing,
        compile=cfg.compile,
    )
    try:
        with features:
            while state.step < cfg.steps:
                started = time.perf_counter()
                input_ids_BT = batches(state.step)
                metrics = train_step(engine, input_ids_BT, desc=desc, step=state.step + 1)
                state.step += 1
                window_tokens += input_ids_BT.numel()
                window_s += time.perf_counter() - started
                bar.update(1)
                bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}")
                if state.step % cfg.log_every_steps == 0 or state.step == cfg.steps:
                    metrics["tokens_per_s"] = window_tokens / window_s
                    if peak is not None:
                        metrics["mfu"] = flops.mfu(metrics["tokens_per_s"] / engine.world_size, flops_per_token, peak)
                    window_tokens, window_s = 0, 0.0
                    for name, value in metrics.items():
                        state.history.setdefault(name, []).append((state.step, float(value)))
                    if on_log is not None and engine.is_main:
                        on_log(state.step, metrics)
                if state.step % cfg.checkpoint_every_steps == 0 or state.step == cfg.steps:
                    written = engine.save(checkpoint_dir, state)  # a collective under ZeRO; rank 0 writes
                    if written is not None:
                        state.checkpoint = written
                        if on_checkpoint is not None:
                            on_checkpoint(written)
                    engine.barrier()  # nobody runs ahead of (or resumes past) rank 0's checkpoint
        engine.finish()
    finally:
        bar.close()
    return state


def parallelize(model: torch.nn.Module, loss_fn: LossFn, cfg: TrainConfig, device: torch.device) -> Engine:
    """The engine that trains ``model`` on this process: torch alone, or under torchrun DDP or DeepSpeed ZeRO.

    Joins the torchrun job first (:func:`~nemoforge.training.distributed.init_from_env`) when ``WORLD_SIZE > 1``.

    Raises:
        NemoforgeError: ``$NEMOFORGE_DISTRIBUTED_ENGINE`` is unknown or asks for a missing deepspeed; the
            DeepSpeed config does not fit the stage (see :func:`~nemoforge.training.zero.DeepSpeedEngine`).
    """
    ctx = init_from_env()
    if ctx is None:
        return TorchEngine(model, loss_fn, cfg, device)
    if engine_kind() == "deepspeed":
        return DeepSpeedEngine(model, loss_fn, cfg, device, ctx)
    return DDPEngine(model, loss_fn, cfg, device, ctx)


def uses_bf16_autocast(device: torch.device, cfg: TrainConfig) -> bool:
    """True when :func:`train_step` runs the loss under bf16 autocast: ``mixed_precision`` bf16, or auto on CUDA."""
    return cfg.mixed_precision == "bf16" or (cfg.mixed_precision == "auto" and device.type == "cuda")


def train_step(engine: Engine, input_ids_BT: torch.Tensor, *, desc: str, step: int) -> dict[str, float]:
    """One update of the global batch ``input_ids_BT``: loss, backward, clip, AdamW and LR-schedule step.

    This rank's rows (:meth:`~nemoforge.training.engines.Engine.local_rows`) go to the engine's device in
    ``engine.micro_batches`` micro-batches. Each micro-batch's loss runs under bf16 autocast when
    :func:`uses_bf16_autocast`; the loss and the extra metrics are averaged over the ranks before the backward
    pass, so a non-finite loss stops every rank at once with nothing updated. Weights, gradients and optimizer
    state stay in the parameters' dtype (float32 in the stages: the master copy under autocast).

    Args:
        engine: from :func:`parallelize`, model in training mode.
        input_ids_BT: this update's global batch (any device).
        desc: label named in the error.
        step: 1-based number of this update, named in the error.

    Returns:
        ``loss``, ``lr`` (the LR this update used), ``grad_norm`` (the total gradient norm before clipping) and
        the loss function's extra metrics, each averaged over the micro-batches and the ranks.

    Raises:
        NemoforgeError: the loss is NaN or infinite.
    """
    device = engine.device
    autocast = uses_bf16_autocast(device, engine.cfg)
    lr = engine.lr()
    parts: list[dict[str, float]] = []
    for micro_ids in engine.local_rows(input_ids_BT).to(device).chunk(engine.micro_batches):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss, extra = engine.wrapped(micro_ids)  # loss_fn(model, micro_ids) inside the engine's wrapper
        parts.append(engine.mean_over_ranks({"loss": loss.item(), **extra}))
        if not math.isfinite(parts[-1]["loss"]):
            raise NemoforgeError(
                f"{desc}: loss is {parts[-1]['loss']} at step {step}: training diverged; lower the lr"
            )
        engine.backward(loss)
        grad_norm = engine.step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    mean = {name: sum(p[name] for p in parts) / len(parts) for name in parts[0]}
    return {"loss": mean.pop("loss"), "lr": lr, "grad_norm": float(grad_norm), **mean}


def _resume(engine: Engine, checkpoint_dir: Path, desc: str) -> TrainState:
    """The state to start from: the newest checkpoint's (loaded into the engine on every rank), or step 0."""
    latest = engine.resume_point(checkpoint_dir)
    if latest is None:
        return TrainState(step=0)
    state = engine.load(latest)
    if engine.is_main:
        announce_resume(desc, state.step, engine.cfg.steps)
    return state
