"""The DeepSpeed ZeRO engine: the loop's AdamW inside ``deepspeed.initialize``, consolidated checkpoints.

The config is :func:`~nemoforge.training.deepspeed_config.deepspeed_config_for` (the TrainJob's
``$NEMOFORGE_DEEPSPEED_CONFIG``, else the stage default). The loop's own AdamW and LR schedule
(:func:`~nemoforge.training.optim.build_optimizer`, torch's AdamW, not fused) are handed to DeepSpeed, so the
update rule and the optimizer state are those of the single-process loop. Activation checkpointing is on
while the engine trains.

Checkpoints hold the full, consolidated state in the single-process layout (:mod:`~nemoforge.training.checkpoint`):
every parameter in float32 and both AdamW moments, gathered from the ZeRO partitions one parameter at a time,
so a run checkpointed on ``N`` ranks resumes on any other ``N``, including 1. Loading writes them back into
the partitions through ``deepspeed.utils.safe_set_full_*`` and ZeRO optimizer internals (the flat float32
partitions, ``_lazy_init_hp_params_optimizer_state``, ``_reassign_or_swap_out_partitioned_parameters``), so
tests/test_training_distributed.py runs ZeRO-2 and ZeRO-3 on gloo in CI: a DeepSpeed upgrade that moves them
fails there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from nemoforge.config import TrainConfig
from nemoforge.errors import NemoforgeError
from nemoforge.training.checkpoint import (
    TrainState,
    load_training_state,
    restore_rng,
    resumed_state,
    save_checkpoint,
)
from nemoforge.training.deepspeed_config import deepspeed_config_for
from nemoforge.training.distributed import DistContext
from nemoforge.training.engines import Engine, LossFn, LossModule
from nemoforge.training.optim import build_optimizer


class _FullState:
    """A consolidated model or optimizer state in the shape :func:`save_checkpoint` writes (``state_dict()``)."""

    def __init__(self, state: dict[str, Any]):
        self._state = state

    def state_dict(self) -> dict[str, Any]:
        return self._state


class DeepSpeedEngine(Engine):
    """DeepSpeed ZeRO (stage from the config) over the loop's AdamW; the full state is gathered for checkpoints."""

    forces_activation_checkpointing = True

    def __init__(
        self, model: torch.nn.Module, loss_fn: LossFn, cfg: TrainConfig, device: torch.device, ctx: DistContext
    ):
        import deepspeed

        super().__init__(model, cfg, device, ctx)
        config = deepspeed_config_for(cfg, ctx.world_size)
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
            model=LossModule(model, loss_fn),
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

    def save(self, checkpoint_dir: Path, state: TrainState) -> Path | None:
        full, moments = self.gather(keep=self.is_main, moments=True, device=torch.device("cpu"))
        if not self.is_main:
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
        restore_rng(saved["rng"])
        return resumed_state(path, saved)

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
