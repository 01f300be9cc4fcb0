"""The shared training loop of distill and cpt: AdamW, warmup + cosine LR, clipping, checkpoint/resume.

Shape legend: ``B`` sequences per step (``TrainConfig.batch_size``), ``T`` tokens per sequence.

Steps count from 1: "step N" is the state after N optimizer updates, and ``step-N/`` its checkpoint.
``batches(i)`` gives the batch of update ``i`` (0-based) as a pure function of ``i``, so a resumed run
sees exactly the data an uninterrupted run would have seen. A checkpoint holds the model
(``model.safetensors``), the optimizer, LR scheduler, RNG state, step and metric history (``state.pt``),
and ``meta.json`` (written last, with the file sizes); it is written into a temporary directory and
renamed, so ``step-N/`` is complete or absent. On start, :func:`train` resumes from the newest complete
checkpoint under ``checkpoint_dir``; resuming gives the same parameters as an uninterrupted run.
Under torchrun (``WORLD_SIZE > 1``) :func:`train` hands over to
:func:`nemoforge.training.distributed.train_distributed` (same batches, same checkpoint layout, any ``N``).
"""

from __future__ import annotations

import functools
import json
import math
import os
import pickle
import re
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model
from tqdm.auto import tqdm

from nemoforge.config import TrainConfig
from nemoforge.errors import NemoforgeError
from nemoforge.runtime import no_progress
from nemoforge.training.flops import mfu, peak_flops_per_s
from nemoforge.training.perf import training_features

LossFn = Callable[[torch.nn.Module, torch.Tensor], tuple[torch.Tensor, dict[str, float]]]
"""``loss_fn(model, input_ids_BT) -> (scalar loss to minimize, extra metrics to log, e.g. loss parts)``."""

BatchFn = Callable[[int], torch.Tensor]
"""``batches(i) -> input_ids_BT`` (LongTensor) for 0-based update ``i``; deterministic in ``i``."""

LogFn = Callable[[int, dict[str, float]], None]
"""``on_log(step, metrics)``: where a stage's live metrics go (the runner wires it to the stage's MLflow run)."""

_STEP_DIR = re.compile(r"^step-(\d+)$")
_FILES = ("model.safetensors", "state.pt")


@dataclass
class TrainState:
    """Where training ended.

    Attributes:
        step: optimizer updates done (``cfg.steps`` after a full run).
        history: logged metrics, ``{name: [(step, value), ...]}``: ``loss``, ``lr``, ``grad_norm``,
            ``tokens_per_s`` (averaged over the steps since the previous log), ``mfu`` (when model FLOPs and a
            peak are known) and the loss function's extra metrics.
        resumed_from_step: the step of the checkpoint resumed from (0: started fresh).
        checkpoint: the last checkpoint written or resumed from (None if none).
    """

    step: int
    history: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    resumed_from_step: int = 0
    checkpoint: Path | None = None


def lr_multiplier(i: int, *, steps: int, warmup_steps: int, min_lr_ratio: float) -> float:
    """LR of 0-based update ``i`` as a fraction of the peak: linear warmup, then cosine to ``min_lr_ratio``.

    ``i < W``: ``(i + 1) / W`` (the peak is reached at update ``W - 1``); then with
    ``progress = (i - W + 1) / (S - W)``: ``r + (1 - r) * (1 + cos(pi * progress)) / 2``, which reaches
    exactly ``r = min_lr_ratio`` at the last update ``S - 1``.
    """
    if i < warmup_steps:
        return (i + 1) / warmup_steps
    progress = min(1.0, (i - warmup_steps + 1) / (steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


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
    checkpoint_dir: Path,
    desc: str,
    on_log: LogFn | None = None,
    on_checkpoint: Callable[[Path], None] | None = None,
    flops_per_token: float | None = None,
) -> TrainState:
    """Train ``model`` for ``cfg.steps`` updates, resuming from the newest checkpoint in ``checkpoint_dir``.

    AdamW (fused on CUDA; weight decay on matrices only) over the parameters that require grad; LR by
    :func:`lr_multiplier`; each update is :func:`train_step` (bf16 autocast per ``cfg.mixed_precision``: by
    default on CUDA, while the CPU runs in the model's dtype). Activation checkpointing and
    per-layer ``torch.compile`` are on for the run when the config asks
    (:func:`~nemoforge.training.perf.training_features`). A checkpoint is written every
    ``cfg.checkpoint_every_steps`` updates and after the last one; of the local checkpoints, the newest
    ``cfg.keep_checkpoints`` are kept once a newer one is complete. Every ``cfg.log_every_steps`` updates, ``tokens_per_s`` (tokens of the batches
    over the wall time of their steps, checkpoint writing excluded) and, given ``flops_per_token`` and a
    peak (``cfg.peak_flops_per_s`` or :func:`~nemoforge.training.flops.peak_flops_per_s`), ``mfu`` are logged.

    Args:
        model: trained in place; its device is the training device.
        loss_fn: see :data:`LossFn`; called under autocast.
        batches: see :data:`BatchFn`.
        cfg: the stage's training section (``recipe.distill`` / ``recipe.cpt``).
        checkpoint_dir: local directory of ``step-N/`` checkpoints (created).
        desc: progress-bar label.
        on_log: called as ``on_log(step, metrics)`` every ``cfg.log_every_steps`` updates.
        on_checkpoint: called with each new complete checkpoint directory (e.g. to upload it).
        flops_per_token: model FLOPs of one trained token (forward + backward) for the logged MFU, from
            :func:`~nemoforge.training.flops.training_flops_per_token`; None: no MFU.

    Returns:
        The final :class:`TrainState`.

    Raises:
        NemoforgeError: the loss became NaN or infinite (names the step; lower the LR).
    """
    from nemoforge.training import distributed

    if distributed.world_size() > 1:  # under torchrun: batches sharded by rank, DDP or DeepSpeed ZeRO-3
        return distributed.train_distributed(
            model, loss_fn, batches, cfg, checkpoint_dir=checkpoint_dir, desc=desc, on_log=on_log,
            on_checkpoint=on_checkpoint, flops_per_token=flops_per_token,
        )  # fmt: skip
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, scheduler = build_optimizer(params, cfg, device)
    checkpoint_dir = Path(checkpoint_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    latest = latest_checkpoint(checkpoint_dir)
    if latest is None:
        torch.manual_seed(cfg.seed)  # dropout RNG; a resumed run restores the saved RNG state instead
        state = TrainState(step=0)
    else:
        state = _load_checkpoint(latest, model, optimizer, scheduler)
        announce_resume(desc, state.step, cfg.steps)

    model.train()
    peak = cfg.peak_flops_per_s or peak_flops_per_s(device)
    window_tokens, window_s = 0, 0.0  # since the last log
    bar = tqdm(total=cfg.steps, initial=state.step, desc=desc, unit="step", disable=no_progress())
    features = training_features(
        model, activation_checkpointing=cfg.activation_checkpointing, compile=cfg.compile
    )
    try:
        with features:
            while state.step < cfg.steps:
                started = time.perf_counter()
                input_ids_BT = batches(state.step).to(device)
                lr = optimizer.param_groups[0]["lr"]
                loss, grad_norm, extra = train_step(
                    model, loss_fn, input_ids_BT, optimizer, params, cfg, desc=desc, step=state.step + 1
                )
                scheduler.step()
                state.step += 1
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                window_tokens += input_ids_BT.numel()
                window_s += time.perf_counter() - started
                metrics = {"loss": loss.item(), "lr": lr, "grad_norm": grad_norm.item(), **extra}
                bar.update(1)
                bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{lr:.2e}")
                if state.step % cfg.log_every_steps == 0 or state.step == cfg.steps:
                    metrics["tokens_per_s"] = window_tokens / window_s
                    if flops_per_token is not None and peak is not None:
                        metrics["mfu"] = mfu(metrics["tokens_per_s"], flops_per_token, peak)
                    window_tokens, window_s = 0, 0.0
                    for name, value in metrics.items():
                        state.history.setdefault(name, []).append((state.step, float(value)))
                    if on_log is not None:
                        on_log(state.step, metrics)
                if state.step % cfg.checkpoint_every_steps == 0 or state.step == cfg.steps:
                    state.checkpoint = save_checkpoint(
                        checkpoint_dir, state, model, optimizer, scheduler, keep=cfg.keep_checkpoints
                    )
                    if on_checkpoint is not None:
                        on_checkpoint(state.checkpoint)
    finally:
        bar.close()
    return state


def uses_bf16_autocast(device: torch.device, cfg: TrainConfig) -> bool:
    """True when :func:`train_step` runs the loss under bf16 autocast: ``mixed_precision`` bf16, or auto on CUDA."""
    return cfg.mixed_precision == "bf16" or (cfg.mixed_precision == "auto" and device.type == "cuda")


def train_step(
    model: torch.nn.Module,
    loss_fn: LossFn,
    input_ids_BT: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    params: list[torch.nn.Parameter],
    cfg: TrainConfig,
    *,
    desc: str,
    step: int,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """One update: the loss (under bf16 autocast when :func:`uses_bf16_autocast`), backward, clip, AdamW step.

    The LR schedule is the caller's (``scheduler.step()`` after this). Weights, gradients and optimizer state
    stay in the parameters' dtype (float32 in the stages: the master copy under autocast).

    Args:
        model: in training mode, on the training device.
        loss_fn: see :data:`LossFn`.
        input_ids_BT: this update's batch, on the model's device.
        optimizer: over ``params``.
        params: the trained parameters (clipped to ``cfg.grad_clip_norm`` together).
        cfg: ``mixed_precision`` and ``grad_clip_norm``.
        desc: label named in the error.
        step: 1-based number of this update, named in the error.

    Returns:
        ``(loss, grad_norm, extra)``: the detached scalar loss, the total gradient norm before clipping (both
        tensors, not synchronized), and the loss function's extra metrics.

    Raises:
        NemoforgeError: the loss is NaN or infinite (nothing is updated).
    """
    device = next(model.parameters()).device
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=uses_bf16_autocast(device, cfg)):
        loss, extra = loss_fn(model, input_ids_BT)
    if not torch.isfinite(loss):
        raise NemoforgeError(f"{desc}: loss is {loss.item()} at step {step}: training diverged; lower the lr")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip_norm)
    optimizer.step()
    return loss.detach(), grad_norm, extra


def build_optimizer(
    params: list[torch.nn.Parameter], cfg: TrainConfig, device: torch.device
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over ``params`` (group 0: matrices with ``cfg.weight_decay``; group 1: vectors, no decay; fused
    on CUDA) and its LR schedule (:func:`lr_multiplier` of ``cfg.lr``), shared by the single-process and
    the distributed loop so that both apply the same update and write the same optimizer state."""
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ],
        lr=cfg.lr,
        fused=device.type == "cuda",
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda i: lr_multiplier(
            i, steps=cfg.steps, warmup_steps=cfg.warmup_steps, min_lr_ratio=cfg.min_lr_ratio
        ),
    )
    return optimizer, scheduler


# ------------------------------------------------------------------------------------- checkpoints
def latest_checkpoint(checkpoint_dir: Path) -> Path | None:
    """The complete ``step-N`` directory with the largest N under ``checkpoint_dir`` (None if none)."""
    for _, path in sorted(_step_dirs(checkpoint_dir), reverse=True):
        if is_complete_checkpoint(path):
            return path
    return None


def is_complete_checkpoint(path: Path) -> bool:
    """True when ``path/meta.json`` exists and every file it lists is there with its recorded size."""
    meta_path = Path(path) / "meta.json"
    if not meta_path.is_file():
        return False
    try:
        sizes = json.loads(meta_path.read_text())["file_sizes"]
    except (ValueError, KeyError):
        return False
    return all(
        (path / name).is_file() and (path / name).stat().st_size == size for name, size in sizes.items()
    )


def save_checkpoint(
    checkpoint_dir: Path,
    state: TrainState,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    *,
    keep: int,
) -> Path:
    """Write ``checkpoint_dir/step-<state.step>`` atomically (temp dir + rename); keep the newest ``keep``.

    Resuming needs only the newest; older ones (``TrainConfig.keep_checkpoints - 1`` of them) are a fallback.
    Each holds the model and two AdamW moments (about 12 bytes per parameter in float32), so the checkpoints
    are most of a run's disk.
    """
    final = checkpoint_dir / f"step-{state.step}"
    tmp = checkpoint_dir / f".tmp-step-{state.step}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(model, str(tmp / "model.safetensors"))
    torch.save(
        {
            "step": state.step,
            "history": state.history,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": _rng_state(),
        },
        tmp / "state.pt",
    )
    sizes = {name: (tmp / name).stat().st_size for name in _FILES}
    (tmp / "meta.json").write_text(json.dumps({"step": state.step, "file_sizes": sizes}) + "\n")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    # a higher step-M/ is a half-written leftover of an earlier attempt (else it had been resumed from): never counted
    for _, path in sorted(d for d in _step_dirs(checkpoint_dir) if d[0] <= state.step)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)
    return final


def announce_resume(desc: str, step: int, steps: int) -> None:
    """Say on the console (stderr, above any progress bar) that training goes on from a checkpoint."""
    tqdm.write(f"resuming {desc} from step {step} of {steps} (its newest checkpoint)", file=sys.stderr)


def _load_checkpoint(
    path: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> TrainState:
    load_model(model, str(path / "model.safetensors"), device=str(next(model.parameters()).device))
    saved = load_training_state(path)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    _restore_rng(saved["rng"])
    return TrainState(
        step=saved["step"], history=saved["history"], resumed_from_step=saved["step"], checkpoint=path
    )


def load_training_state(path: Path, *, mmap: bool = False) -> dict:
    """``path/state.pt`` (step, history, optimizer, scheduler, RNG) loaded without running any pickled code.

    ``torch.load(weights_only=True)``: tensors, numbers, strings and containers only, so a ``state.pt`` planted
    under a run's checkpoint prefix cannot execute code on resume (the file holds no other type).

    Raises:
        NemoforgeError: the file holds anything else (a crafted file, or a checkpoint from a version that
            pickled other objects), naming it and how to continue.
    """
    file = path / "state.pt"
    try:
        return torch.load(file, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        raise NemoforgeError(
            f"refusing to resume from {file}: it holds objects other than tensors and plain values "
            f"({str(err).splitlines()[0][:200]}); delete this checkpoint, and its copy under the stage's "
            "checkpoints/ in the artifact store, to restart the stage from its input"
        ) from None


def _step_dirs(checkpoint_dir: Path) -> list[tuple[int, Path]]:
    if not Path(checkpoint_dir).is_dir():
        return []
    return [
        (int(m.group(1)), p)
        for p in Path(checkpoint_dir).iterdir()
        if p.is_dir() and (m := _STEP_DIR.match(p.name))
    ]


def _rng_state() -> dict[str, object]:
    rng: dict[str, object] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def _restore_rng(rng: dict[str, object]) -> None:
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
