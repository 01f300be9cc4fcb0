"""Training checkpoints: the ``step-N/`` layout every engine writes and reads, complete or absent.

A checkpoint ``checkpoint_dir/step-N/`` is the state after N optimizer updates:

* ``model.safetensors``: every parameter and persistent buffer (float32 in the stages; tied weights once);
* ``state.pt``: step, metric history, optimizer and LR-scheduler state dicts, RNG state; tensors and plain
  values only, loaded with ``torch.load(weights_only=True)`` (:func:`load_training_state`), so no pickled code
  runs on resume;
* ``meta.json``: the step and each file's size, written last.

It is written into a temporary directory and renamed, so ``step-N/`` is complete or absent. Every engine
(single process, DDP, DeepSpeed ZeRO) writes the full, consolidated single-process state, so a run
checkpointed on ``N`` ranks resumes on any other number of ranks.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import load_model, save_model
from tqdm.auto import tqdm

from nemoforge.errors import NemoforgeError

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


class HasStateDict(Protocol):
    """A module, optimizer or scheduler, or a consolidated state standing in for one (DeepSpeed's)."""

    def state_dict(self) -> dict[str, Any]: ...


def checkpoint_step(path: Path | None) -> int:
    """N of a ``step-N`` directory (0 for None: no checkpoint)."""
    return 0 if path is None else int(Path(path).name.removeprefix("step-"))


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
    model: HasStateDict,
    optimizer: HasStateDict,
    scheduler: HasStateDict,
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
            "rng": rng_state(),
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


def load_checkpoint(
    path: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> TrainState:
    """Restore the model, optimizer, scheduler and RNG from ``path`` (a ``step-N`` directory) in place.

    Returns:
        The state at ``path``: its step, history, ``resumed_from_step`` and ``checkpoint``.

    Raises:
        NemoforgeError: ``state.pt`` holds more than tensors and plain values (:func:`load_training_state`).
    """
    load_model(model, str(path / "model.safetensors"), device=str(next(model.parameters()).device))
    saved = load_training_state(path)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    restore_rng(saved["rng"])
    return resumed_state(path, saved)


def resumed_state(path: Path, saved: dict[str, Any]) -> TrainState:
    """The :class:`TrainState` of a run resumed from ``path`` whose ``state.pt`` is ``saved``."""
    return TrainState(step=saved["step"], history=saved["history"], resumed_from_step=saved["step"], checkpoint=path)


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


def announce_resume(desc: str, step: int, steps: int) -> None:
    """Say on the console (stderr, above any progress bar) that training goes on from a checkpoint."""
    tqdm.write(f"resuming {desc} from step {step} of {steps} (its newest checkpoint)", file=sys.stderr)


def rng_state() -> dict[str, object]:
    """The CPU (and, where present, every CUDA device's) torch RNG state, as a checkpoint stores it."""
    rng: dict[str, object] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def restore_rng(rng: dict[str, object]) -> None:
    """Set the RNG state that :func:`rng_state` returned (the CUDA part only where CUDA is present)."""
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def _step_dirs(checkpoint_dir: Path) -> list[tuple[int, Path]]:
    if not Path(checkpoint_dir).is_dir():
        return []
    return [
        (int(m.group(1)), p)
        for p in Path(checkpoint_dir).iterdir()
        if p.is_dir() and (m := _STEP_DIR.match(p.name))
    ]
