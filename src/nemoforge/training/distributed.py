"""Data-parallel training under torchrun: rank-sharded batches, DDP or DeepSpeed ZeRO-3, rank-0 checkpoints.

Shape legend: ``B`` sequences per optimizer step over all ranks (``TrainConfig.batch_size``), ``b = B / N``
sequences per rank (``N`` = ``WORLD_SIZE``), ``T`` tokens per sequence.

:func:`~nemoforge.training.loop.train` hands over to :func:`train_distributed` when ``WORLD_SIZE > 1``.
Update ``i`` takes the same deterministic batch ``batches(i)`` on every rank and rank ``r`` trains on its
rows ``r*b .. r*b + b - 1``; with gradients averaged over ranks and losses that are means over equal-length
rows, an update at any ``N`` equals the single-process update on the whole batch (up to float rounding), so
the global batch and the data order do not depend on ``N``. The model is wrapped by

* **DeepSpeed ZeRO-3** when ``deepspeed`` is importable and CUDA is present (the TrainJob image): the config
  is ``$NEMOFORGE_DEEPSPEED_CONFIG`` (what :func:`~nemoforge.cluster.trainjob.build_trainjob` sets; else
  :func:`~nemoforge.cluster.trainjob.deepspeed_config` of the stage with one node of ``N`` GPUs: ZeRO-3, bf16,
  no CPU offload), minus its ``optimizer``/``scheduler`` sections: the loop's own AdamW and LR schedule
  (:func:`~nemoforge.training.loop.build_optimizer`, the same hyperparameters) are handed to DeepSpeed, so the
  update rule and the checkpointed optimizer state are those of the single-process loop. Activation
  checkpointing is switched on (``gradient_checkpointing_enable``) while the engine trains;
* **torch DDP** otherwise (CPU/gloo, or CUDA without deepspeed).

``NEMOFORGE_DISTRIBUTED_ENGINE=ddp|deepspeed`` forces one (tests run DeepSpeed on CPU with gloo this way).

Checkpoints keep the single-process layout of :mod:`nemoforge.training.loop` and hold the full, consolidated
state (every parameter in float32 and both AdamW moments gathered from the ZeRO partitions), so a run
checkpointed at ``N`` ranks resumes at any other ``N``, including 1. Only rank 0 writes checkpoints, calls
``on_log``/``on_checkpoint`` and shows progress; the others wait at a barrier. Every rank resumes from its
own ``checkpoint_dir`` (on a cluster each pod fetches the checkpoint from the store), and all must find the
same step as rank 0.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import safe_open
from tqdm.auto import tqdm

from nemoforge.config import TrainConfig
from nemoforge.errors import NemoforgeError
from nemoforge.runtime import no_progress
from nemoforge.training.flops import mfu, peak_flops_per_s
from nemoforge.training.loop import (
    BatchFn,
    LossFn,
    TrainState,
    _load_checkpoint,
    _restore_rng,
    announce_resume,
    build_optimizer,
    latest_checkpoint,
    load_training_state,
    save_checkpoint,
    uses_bf16_autocast,
)
from nemoforge.training.perf import training_features

ENGINE_ENV = "NEMOFORGE_DISTRIBUTED_ENGINE"
"""``auto`` (default: DeepSpeed when importable and CUDA is present, else DDP), ``ddp`` or ``deepspeed``."""
DEEPSPEED_CONFIG_ENV = "NEMOFORGE_DEEPSPEED_CONFIG"
"""The DeepSpeed config as JSON text (set on TrainJob workers by the launcher)."""


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


def deepspeed_config_for(cfg: TrainConfig, ctx: DistContext) -> dict[str, Any]:
    """The DeepSpeed config of this run: ``$NEMOFORGE_DEEPSPEED_CONFIG``, else the stage default for ``N`` GPUs.

    The ``optimizer`` and ``scheduler`` sections are dropped (the loop's AdamW and schedule replace them).

    Raises:
        NemoforgeError: the config's ``train_batch_size`` differs from ``cfg.batch_size``, or the batch does
            not split into ``N`` ranks x ``gradient_accumulation_steps`` whole micro-batches.
    """
    from nemoforge.cluster.trainjob import deepspeed_config
    from nemoforge.config import StageResources

    text = os.environ.get(DEEPSPEED_CONFIG_ENV)
    if text:
        config = json.loads(text)
    else:
        config = deepspeed_config(cfg, StageResources(num_nodes=1, gpu_count=ctx.world_size))
    if config.get("train_batch_size", cfg.batch_size) != cfg.batch_size:
        raise NemoforgeError(
            f"{DEEPSPEED_CONFIG_ENV}: train_batch_size={config['train_batch_size']} but the stage's "
            f"batch_size={cfg.batch_size}: regenerate the config from the recipe"
        )
    accumulation = int(config.get("gradient_accumulation_steps", 1))
    if cfg.batch_size % (ctx.world_size * accumulation):
        raise NemoforgeError(
            f"batch_size={cfg.batch_size} does not split over {ctx.world_size} ranks x {accumulation} "
            f"accumulation steps: use a multiple of {ctx.world_size * accumulation}"
        )
    config = {k: v for k, v in config.items() if k not in ("optimizer", "scheduler")}
    config["train_batch_size"] = cfg.batch_size
    config["gradient_accumulation_steps"] = accumulation
    config["train_micro_batch_size_per_gpu"] = cfg.batch_size // (ctx.world_size * accumulation)
    config["gradient_clipping"] = cfg.grad_clip_norm
    return config


# ------------------------------------------------------------------------------------------ engines
class _LossModule(torch.nn.Module):
    """The loss as a module: ``forward(input_ids_bT) = loss_fn(model, input_ids_bT)``.

    DDP and DeepSpeed wrap this instead of the model, so a loss function may use any part of the plain
    model (``model.base_model``, ``model.get_output_embeddings().weight``) and its gradients still go
    through the engine's hooks.
    """

    def __init__(self, model: torch.nn.Module, loss_fn: LossFn):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, input_ids_bT: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        return self.loss_fn(self.model, input_ids_bT)


class _DDPEngine:
    """torch DDP: every rank holds the whole model and optimizer, so rank 0's are the full state."""

    def __init__(
        self, model: torch.nn.Module, loss_fn: LossFn, cfg: TrainConfig, ctx: DistContext, device: torch.device
    ):
        self.model = model
        self.cfg = cfg
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer, self.scheduler = build_optimizer(self.params, cfg, device)
        device_ids = [device.index] if device.type == "cuda" else None
        # construction broadcasts rank 0's parameters, so every replica starts from the same weights
        self.wrapped = torch.nn.parallel.DistributedDataParallel(_LossModule(model, loss_fn), device_ids=device_ids)
        self.micro_batches = 1

    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def backward(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()  # DDP all-reduces (averages) the gradients here

    def step(self) -> float:
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip_norm)
        self.optimizer.step()
        self.scheduler.step()
        return float(grad_norm)

    def save(self, checkpoint_dir: Path, state: TrainState, ctx: DistContext) -> Path | None:
        if not ctx.is_main:
            return None
        return save_checkpoint(
            checkpoint_dir, state, self.model, self.optimizer, self.scheduler, keep=self.cfg.keep_checkpoints
        )

    def load(self, path: Path) -> TrainState:
        return _load_checkpoint(path, self.model, self.optimizer, self.scheduler)

    def finish(self) -> None:
        """Nothing to undo: ``self.model`` already holds the trained weights on every rank."""


class _FullState:
    """A consolidated model or optimizer state in the shape :func:`save_checkpoint` writes (``state_dict()``)."""

    def __init__(self, state: dict[str, Any]):
        self._state = state

    def state_dict(self) -> dict[str, Any]:
        return self._state


class _DeepSpeedEngine:
    """DeepSpeed ZeRO (stage from the config) over the loop's AdamW; the full state is gathered for checkpoints."""

    def __init__(
        self, model: torch.nn.Module, loss_fn: LossFn, cfg: TrainConfig, ctx: DistContext, device: torch.device
    ):
        import deepspeed

        config = deepspeed_config_for(cfg, ctx)
        self.model = model
        self.cfg = cfg
        self.micro_batches = config["gradient_accumulation_steps"]
        self.zero_stage = config.get("zero_optimization", {}).get("stage", 0)
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer, scheduler = build_optimizer(trainable, cfg, torch.device("cpu"))  # torch AdamW, not fused
        # recorded before DeepSpeed partitions the parameters in place: the parameters in the order of
        # torch's optimizer state_dict (group by group), each group's indices and hyperparameters
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        self.groups: list[tuple[list[int], dict[str, Any]]] = []
        for g in optimizer.param_groups:
            start = sum(len(idx) for idx, _ in self.groups)
            self.groups.append((list(range(start, start + len(g["params"]))), {k: v for k, v in g.items() if k != "params"}))
        self.names = _param_names(model, self.params)
        self.wrapped, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=_LossModule(model, loss_fn),
            optimizer=optimizer,
            lr_scheduler=scheduler,
            config=config,
            dist_init_required=False,
        )
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if head is not None and self.zero_stage == 3:
            # chunked cross-entropy reads the LM head's weight outside the head's forward: ZeRO-3 must keep
            # it gathered for the whole loss (forward and backward)
            deepspeed.zero.register_external_parameter(self.wrapped.module, head.weight)
        self.device = device

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def backward(self, loss: torch.Tensor) -> None:
        self.wrapped.backward(loss)  # scales by 1/gradient_accumulation_steps and reduce-scatters

    def step(self) -> float:
        self.wrapped.step()  # clips, steps the optimizer and the LR schedule at the accumulation boundary
        return float(self.wrapped.get_global_grad_norm())

    def gather(
        self, *, keep: bool, moments: bool, device: torch.device
    ) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
        """Full float32 parameters by name and (with ``moments``) each parameter's AdamW ``exp_avg``/``exp_avg_sq``.

        A collective: every rank calls it. Each parameter is all-gathered in turn (at most one full parameter
        and its moments on the GPU at a time); a rank with ``keep`` copies them to ``device``, the others
        drop them.

        Returns:
            ``({name: tensor}, [{"exp_avg", "exp_avg_sq"} per parameter])`` in the order of ``self.params``;
            empty without ``keep``. Tied weights appear under each of their names (one tensor).
        """
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        full: dict[str, torch.Tensor] = {}
        per_param: list[dict[str, torch.Tensor]] = []
        for p, names in zip(self.params, self.names, strict=True):
            tensor = safe_get_full_fp32_param(p).detach()
            pair = {k: safe_get_full_optimizer_state(p, k).detach() for k in ("exp_avg", "exp_avg_sq")} if moments else {}
            if keep:
                tensor = tensor.to(device, copy=True)
                per_param.append({k: v.to(device, copy=True) for k, v in pair.items()})
                for name in names:
                    full[name] = tensor
        return full, per_param

    def save(self, checkpoint_dir: Path, state: TrainState, ctx: DistContext) -> Path | None:
        full, moments = self.gather(keep=ctx.is_main, moments=True, device=torch.device("cpu"))
        if not ctx.is_main:
            return None
        persistent = set(self.model.state_dict())  # keys only: ZeRO-3 parameters are empty here
        buffers = {n: b.detach().cpu() for n, b in self.model.named_buffers() if n in persistent}
        step = torch.tensor(float(state.step), dtype=torch.float32)
        optimizer_state = {
            "state": {i: {"step": step.clone(), **m} for i, m in enumerate(moments)},
            "param_groups": [{**hyper, "lr": self.lr(), "params": idx} for idx, hyper in self.groups],
        }
        return save_checkpoint(
            checkpoint_dir,
            state,
            _FullState(full | buffers),
            _FullState(optimizer_state),
            self.scheduler,
            keep=self.cfg.keep_checkpoints,
        )

    def load(self, path: Path) -> TrainState:
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        # memory-mapped, tensor by tensor: the N ranks of a node share the page cache instead of N copies
        saved = load_training_state(path, mmap=True)
        moments = saved["optimizer"]["state"]  # by index in the optimizer's group order, as self.params
        zero = self.optimizer
        # the torch AdamW (zero.optimizer) keys its state by this rank's flat float32 partitions; it creates
        # the state lazily at its first step, so create it here for the moments to be written into
        flats = zero.fp32_partitioned_groups_flat if self.zero_stage == 3 else zero.single_partition_of_fp32_groups
        for flat in flats:
            state = zero.optimizer.state[flat]
            state["step"] = torch.tensor(float(saved["step"]), dtype=torch.float32)
            state.setdefault("exp_avg", torch.zeros_like(flat, memory_format=torch.preserve_format))
            state.setdefault("exp_avg_sq", torch.zeros_like(flat, memory_format=torch.preserve_format))
        if self.zero_stage != 3:
            zero._lazy_init_hp_params_optimizer_state()  # ZeRO-1/2 map each parameter into the new state (its step does this)
        with safe_open(str(path / "model.safetensors"), framework="pt", device="cpu") as saved_model:
            stored = set(saved_model.keys())
            for i, (p, names) in enumerate(zip(self.params, self.names, strict=True)):
                name = next((n for n in names if n in stored), None)
                if name is None:
                    raise NemoforgeError(f"checkpoint {path} has no tensor for parameter {names[0]}")
                safe_set_full_fp32_param(p, saved_model.get_tensor(name).to(self.device, torch.float32))
                for key in ("exp_avg", "exp_avg_sq") if i in moments else ():  # no state: never had a gradient
                    safe_set_full_optimizer_state(p, moments[i][key].to(self.device), key)
        self._copy_masters_to_working_weights()
        self.scheduler.load_state_dict(saved["scheduler"])
        for group, lr in zip(self.scheduler.optimizer.param_groups, self.scheduler.get_last_lr(), strict=True):
            group["lr"] = lr
        _restore_rng(saved["rng"])
        return TrainState(
            step=saved["step"], history=saved["history"], resumed_from_step=saved["step"], checkpoint=path
        )

    def _copy_masters_to_working_weights(self) -> None:
        """After the float32 masters were set: copy them into the (bf16) working partitions, as a step does."""
        zero = self.optimizer
        if self.zero_stage == 3:
            for i in range(len(zero.fp16_partitioned_groups_flat)):
                zero._reassign_or_swap_out_partitioned_parameters(i)  # what ZeRO-3's own step calls
        else:
            zero.update_lp_params()  # ZeRO-1/2: copy and all-gather (a collective)

    def finish(self) -> None:
        """Gather the trained float32 weights back into ``self.model`` on every rank and drop the engine."""
        full, _ = self.gather(keep=True, moments=False, device=self.device)
        self.wrapped.destroy()
        with torch.no_grad():
            for p, names in zip(self.params, self.names, strict=True):
                p.data = full[names[0]]


def _param_names(model: torch.nn.Module, params: list[torch.nn.Parameter]) -> list[list[str]]:
    """Every name of each of ``params`` in ``model`` (tied weights have several)."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return [names[id(p)] for p in params]


# --------------------------------------------------------------------------------------------- loop
def train_distributed(
    model: torch.nn.Module,
    loss_fn: LossFn,
    batches: BatchFn,
    cfg: TrainConfig,
    *,
    checkpoint_dir: Path,
    desc: str,
    on_log: Callable[[int, dict[str, float]], None] | None = None,
    on_checkpoint: Callable[[Path], None] | None = None,
    flops_per_token: float | None = None,
) -> TrainState:
    """:func:`~nemoforge.training.loop.train` on ``N`` torchrun ranks (same arguments, same result on every rank).

    Each update: every rank takes its ``b`` rows of ``batches(i)`` (split further into the DeepSpeed config's
    ``gradient_accumulation_steps`` micro-batches), the loss and metrics are averaged over ranks before the
    backward pass (so a non-finite loss stops every rank at once), gradients are averaged by the engine,
    clipped to ``cfg.grad_clip_norm``, and AdamW steps. Autocast follows ``cfg.mixed_precision``
    (:func:`~nemoforge.training.loop.uses_bf16_autocast`); activation checkpointing and compile follow the
    config (:func:`~nemoforge.training.perf.training_features`), checkpointing always on under DeepSpeed.
    ``tokens_per_s`` counts the tokens of all ranks over the steps since the previous log (checkpoint writing
    excluded); ``mfu`` is per GPU (``tokens_per_s / N``). Rank 0 writes checkpoints and calls
    ``on_log``/``on_checkpoint``; the others wait at a barrier.

    Returns:
        The final :class:`~nemoforge.training.loop.TrainState` (the same history on every rank); ``model``
        holds the trained float32 weights on every rank.

    Raises:
        NemoforgeError: the loss became NaN or infinite; ``B`` does not split over the ranks; a rank's
            ``checkpoint_dir`` lacks the checkpoint rank 0 resumes from.
    """
    ctx = init_from_env()
    assert ctx is not None, "train_distributed runs under torchrun (WORLD_SIZE > 1)"
    device = next(model.parameters()).device
    checkpoint_dir = Path(checkpoint_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)  # identical initial RNG on every rank; a resumed run restores rank 0's
    use_deepspeed = engine_kind() == "deepspeed"
    engine = (_DeepSpeedEngine if use_deepspeed else _DDPEngine)(model, loss_fn, cfg, ctx, device)
    state = _resume(engine, checkpoint_dir, ctx)
    if state.step and ctx.is_main:
        announce_resume(desc, state.step, cfg.steps)
    reduce_device = device if ctx.backend == "nccl" else torch.device("cpu")
    autocast = uses_bf16_autocast(device, cfg)
    peak = cfg.peak_flops_per_s or peak_flops_per_s(device)
    window_tokens, window_s = 0, 0.0  # since the last log

    model.train()
    bar = tqdm(total=cfg.steps, initial=state.step, desc=desc, unit="step", disable=no_progress() or not ctx.is_main)
    features = training_features(
        model, activation_checkpointing=cfg.activation_checkpointing or use_deepspeed, compile=cfg.compile
    )
    try:
        with features:
            while state.step < cfg.steps:
                started = time.perf_counter()
                input_ids_BT = batches(state.step)
                local_ids_bT = rank_rows(input_ids_BT, ctx).to(device)
                lr = engine.lr()
                parts: list[dict[str, float]] = []
                for micro_ids in local_ids_bT.chunk(engine.micro_batches):
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                        loss, extra = engine.wrapped(micro_ids)  # loss_fn(model, micro_ids) inside the engine
                    parts.append(mean_over_ranks({"loss": loss.item(), **extra}, reduce_device))
                    if not math.isfinite(parts[-1]["loss"]):
                        raise NemoforgeError(
                            f"{desc}: loss is {parts[-1]['loss']} at step {state.step + 1}: training diverged; "
                            "lower the lr"
                        )
                    engine.backward(loss)
                    grad_norm = engine.step()
                state.step += 1
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                window_tokens += input_ids_BT.numel()
                window_s += time.perf_counter() - started
                metrics = {name: sum(p[name] for p in parts) / len(parts) for name in parts[0]}
                metrics |= {"lr": lr, "grad_norm": grad_norm}
                bar.update(1)
                bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{lr:.2e}")
                if state.step % cfg.log_every_steps == 0 or state.step == cfg.steps:
                    metrics["tokens_per_s"] = window_tokens / window_s
                    if flops_per_token is not None and peak is not None:
                        metrics["mfu"] = mfu(metrics["tokens_per_s"] / ctx.world_size, flops_per_token, peak)
                    window_tokens, window_s = 0, 0.0
                    for name, value in metrics.items():
                        state.history.setdefault(name, []).append((state.step, float(value)))
                    if on_log is not None and ctx.is_main:
                        on_log(state.step, metrics)
                if state.step % cfg.checkpoint_every_steps == 0 or state.step == cfg.steps:
                    written = engine.save(checkpoint_dir, state, ctx)  # a collective under ZeRO; rank 0 writes
                    if written is not None:
                        state.checkpoint = written
                        if on_checkpoint is not None:
                            on_checkpoint(written)
                    dist.barrier()  # nobody runs ahead of (or resumes past) rank 0's checkpoint
        engine.finish()
    finally:
        bar.close()
    return state


def _resume(engine: _DDPEngine | _DeepSpeedEngine, checkpoint_dir: Path, ctx: DistContext) -> TrainState:
    """Load rank 0's newest checkpoint step on every rank (each from its own ``checkpoint_dir``)."""
    latest = latest_checkpoint(checkpoint_dir)
    main_step = broadcast_from_main(_step_of(latest))
    if _step_of(latest) != main_step:
        raise NemoforgeError(
            f"rank {ctx.rank}: newest checkpoint in {checkpoint_dir} is step {_step_of(latest)}, rank 0 resumes "
            f"from step {main_step}: every rank needs the same checkpoint (fetch it from the store first)"
        )
    if latest is None:
        return TrainState(step=0)
    return engine.load(latest)


def _step_of(path: Path | None) -> int:
    return 0 if path is None else int(path.name.removeprefix("step-"))
