"""Reasoning-toggle SFT: token-level cross-entropy on assistant tokens of on/off chats, one chat per row.

Llama-Nemotron §3-4 (arXiv 2505.00949): system prompt ``detailed thinking on|off``, on/off samples mixed
in each batch, token-level CE, cosine LR with linear warmup. Shape legend: ``B`` rows, ``T`` tokens.

Written under ``output_uri``: ``checkpoints/step-N/`` (resumable), ``model/`` (the export),
``data/`` (the split rl and eval read: :mod:`~nemoforge.data.sft_split`), ``plots/loss_curve.png``,
``samples/toggle_{before,after}.json`` (held-out generations on/off).

Data-parallel like distill and cpt: under torchrun (a TrainJob on a cluster) every rank loads the model and the
same packed rows, measures the held-out loss and toggle before, and trains its rows of each global batch (DDP or
DeepSpeed ZeRO, :func:`~nemoforge.training.loop.parallelize`); rank 0 alone measures after, exports and writes.
The loss is normalized by the assistant tokens of the whole global batch (:class:`GlobalTokenMean`), so an
update on ``N`` ranks equals the single-process update for any ``N`` and any micro-batching.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from nemoforge.artifacts.store import ArtifactStore
from nemoforge.artifacts.uris import join_uri
from nemoforge.config import Recipe
from nemoforge.data.packing import token_digest
from nemoforge.data.reasoning import encode_chat, from_signed_ids, pack_chats, to_signed_ids
from nemoforge.data.sft_split import load_sft_split, write_sft_split
from nemoforge.models.generate import pad_id
from nemoforge.runtime import compute_device, seed_for
from nemoforge.stages.chat import toggle_compliance
from nemoforge.stages.result import DatasetRef, StageResult
from nemoforge.stages.training import (
    checkpoint_uploader,
    export_model,
    fetch_latest_checkpoint,
    plot_history,
)
from nemoforge.training.distributed import is_main_process
from nemoforge.training.flops import training_flops_per_token
from nemoforge.training.loop import BatchFn, LogFn, epoch_batches, train
from nemoforge.training.losses import causal_lm_loss_BT


def masked_ce_sum_count(
    model: torch.nn.Module, input_ids_BT: torch.Tensor, loss_mask_BT: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token CE (nats) over target tokens whose mask is set, and their count."""
    ce_BT = causal_lm_loss_BT(model(input_ids_BT, use_cache=False).logits, input_ids_BT)
    target_BT = loss_mask_BT[:, 1:].to(ce_BT.dtype)
    return (ce_BT * target_BT).sum(), target_BT.sum()


def assistant_tokens(signed_BT: torch.Tensor) -> int:
    """Target tokens :func:`masked_ce_sum_count` counts in ``signed_BT``: masked positions after the first."""
    return int(from_signed_ids(signed_BT)[1][:, 1:].sum())


class GlobalTokenMean:
    """sft's batches and loss with token-level averaging over the GLOBAL batch, on any number of ranks.

    The loop averages the loss of each micro-batch over the micro-batches and the ranks (DDP averages gradients,
    DeepSpeed divides by its accumulation steps). A per-micro-batch mean over its own assistant tokens would
    then weight a token by how many others share its micro-batch. Instead, a micro-batch of ``b`` rows of the
    global batch of ``B`` rows with ``C`` assistant tokens returns ``sum_CE x (B / b) / C``: averaged over the
    ``B / b`` micro-batches of all ranks this is ``sum over the global batch / C``, the single-process loss.
    The global ``B`` and ``C`` come from :meth:`batches`, which the loop calls with the update's global batch
    on every rank before that update's micro-batches.

    Args:
        batches: the global batch of each update (signed ids, :func:`~nemoforge.data.reasoning.to_signed_ids`).
    """

    def __init__(self, batches: BatchFn):
        self._batches = batches
        self._global: tuple[int, int] | None = None  # (B, C) of the current update

    def batches(self, i: int) -> torch.Tensor:
        """``batches(i)``, noting its rows and assistant tokens for :meth:`loss`."""
        signed_BT = self._batches(i)
        self._global = (signed_BT.shape[0], assistant_tokens(signed_BT))
        return signed_BT

    def loss(self, model: torch.nn.Module, signed_bT: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """This micro-batch's share of the global mean CE per assistant token (see the class); ``assistant_tokens``:
        the global batch's."""
        assert self._global is not None, "loss before batches: the loop takes the global batch first"
        num_rows, num_tokens = self._global
        input_ids_bT, loss_mask_bT = from_signed_ids(signed_bT)
        total, _ = masked_ce_sum_count(model, input_ids_bT, loss_mask_bT)
        return total * (num_rows / signed_bT.shape[0]) / max(num_tokens, 1), {"assistant_tokens": float(num_tokens)}


@torch.no_grad()
def heldout_assistant_loss(
    model: torch.nn.Module, input_ids_NT: torch.Tensor, loss_mask_NT: torch.Tensor, batch_size: int
) -> float:
    """Mean CE per assistant token of held-out rows (nats/token)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0.0
    for start in range(0, input_ids_NT.shape[0], batch_size):
        s, c = masked_ce_sum_count(
            model, input_ids_NT[start : start + batch_size].to(device), loss_mask_NT[start : start + batch_size].to(device)
        )
        total, count = total + s.item(), count + c.item()
    model.train(was_training)
    return total / max(count, 1.0)


def run(
    recipe: Recipe, *, model_uri: str, output_uri: str, store: ArtifactStore, on_log: LogFn | None = None
) -> StageResult:
    """Fine-tune the model at ``model_uri`` on toggle chats (``recipe.data.sft_uri`` or the generated set).

    Args:
        recipe: the resolved recipe (``sft`` section, ``data.sft_uri``, ``seed``, ``dtype``).
        model_uri: the model to fine-tune (the newest upstream export).
        output_uri: where checkpoints, the export, plots and samples go.
        store: the artifact store.
        on_log: called as ``on_log(step, metrics)`` while training, every ``sft.log_every_steps`` updates
            (the runner logs them to the stage's MLflow run); None: only the returned history.

    Returns:
        metrics ``loss_heldout_{before,after}`` (assistant-token CE), ``toggle_on/off/toggle_{before,after}``,
        ``loss_final``, ``train_steps``, ``train_tokens``, ``params``; history; outputs ``model``, ``data``
        (the split, with its digest: what rl and eval read), ``checkpoints``, ``samples``; datasets
        ``sft-train``/``sft-heldout``. On a torchrun rank other than 0, only the history and the ``device`` tag.

    Raises:
        InputNotFoundError: the model or the SFT data does not exist.
        NemoforgeError: bad SFT rows, or training diverged.
    """
    from transformers import AutoTokenizer

    from nemoforge.models.convert import load_causal_lm

    cfg = recipe.sft
    device = compute_device()
    model_dir = store.fetch(model_uri)
    model = load_causal_lm(model_dir, dtype=torch.float32).to(device)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, config=model.config)

    train_samples, split = load_sft_split(recipe, store)
    heldout_samples, source = split.heldout, split.source.name
    pack = {
        "seq_len_tokens": cfg.seq_len_tokens, "pad_token_id": pad_id(tokenizer), "seed": seed_for(recipe, "sft.pack"),
    }
    train_ids_NT, train_mask_NT = pack_chats(
        [encode_chat(tokenizer, s, cfg.seq_len_tokens) for s in train_samples], **pack
    )
    heldout_ids_NT, heldout_mask_NT = pack_chats(
        [encode_chat(tokenizer, s, cfg.seq_len_tokens) for s in heldout_samples], **pack
    )
    heldout_ids_NT, heldout_mask_NT = heldout_ids_NT[: cfg.heldout_sequences], heldout_mask_NT[: cfg.heldout_sequences]
    toggle_prompts = sorted({s.prompt for s in heldout_samples})[: cfg.num_toggle_prompts]

    def measure() -> tuple[dict[str, float], list[dict[str, str]]]:
        toggle, replies = toggle_compliance(model, tokenizer, toggle_prompts, max_new_tokens=cfg.max_new_tokens)
        loss = heldout_assistant_loss(model, heldout_ids_NT, heldout_mask_NT, cfg.batch_size)
        return {"loss_heldout": loss, **toggle}, replies

    before, replies_before = measure()  # on every rank: the others would only wait for rank 0
    checkpoints_uri = join_uri(output_uri, "checkpoints")
    objective = GlobalTokenMean(
        epoch_batches(to_signed_ids(train_ids_NT, train_mask_NT), cfg.batch_size, seed=seed_for(recipe, "sft.batches"))
    )
    with tempfile.TemporaryDirectory(prefix="nemoforge-sft-") as tmp:
        work = Path(tmp)
        fetch_latest_checkpoint(store, checkpoints_uri, work / "checkpoints")  # every rank: each resumes its own copy
        state = train(
            model,
            objective.loss,
            objective.batches,
            cfg,
            seed=seed_for(recipe, "sft.train"),
            checkpoint_dir=work / "checkpoints",
            desc="sft",
            on_log=on_log,
            on_checkpoint=checkpoint_uploader(store, checkpoints_uri, cfg.keep_checkpoints),
            flops_per_token=training_flops_per_token(model.config, train_ids_NT.shape[1]),
            peak_flops_per_s=cfg.peak_flops_per_s,
        )
        if not is_main_process():  # under torchrun, rank 0 measures, exports and writes; the others only train
            return StageResult(history=state.history, tags={"device": str(device)})
        after, replies_after = measure()

        exported = export_model(model, tokenizer, recipe, output_uri=output_uri, store=store, work=work)
        plot_uri = join_uri(output_uri, "plots", "loss_curve.png")
        store.put(plot_history(state.history, work / "loss_curve.png", "sft: assistant-token loss"), plot_uri)
        samples_uri = join_uri(output_uri, "samples")
        for name, replies in (("toggle_before", replies_before), ("toggle_after", replies_after)):
            (work / f"{name}.json").write_text(json.dumps(replies, indent=1) + "\n")
            store.put(work / f"{name}.json", join_uri(samples_uri, f"{name}.json"))
    data_uri = join_uri(output_uri, "data")
    data_digest = write_sft_split(split, store, data_uri)

    num_params = sum(p.numel() for p in model.parameters())
    metrics = {f"{k}_before": v for k, v in before.items()} | {f"{k}_after": v for k, v in after.items()}
    metrics |= {
        "loss_final": state.history["loss"][-1][1],
        "train_steps": float(state.step),
        "train_tokens": float(state.step * cfg.batch_size * train_ids_NT.shape[1]),  # padded rows
        "params": float(num_params),
    }
    return StageResult(
        metrics=metrics,
        history=state.history,
        outputs={"model": exported.uri, "data": data_uri, "checkpoints": checkpoints_uri, "samples": samples_uri},
        digests={"model": exported.digest, "data": data_digest},
        plots={"loss_curve": plot_uri},
        datasets=[
            DatasetRef("sft-train", source, token_digest(train_ids_NT, train_mask_NT), len(train_samples), "training"),
            DatasetRef(
                "sft-heldout", source, token_digest(heldout_ids_NT, heldout_mask_NT), len(heldout_samples), "validation"
            ),
        ],
        tags={
            "device": str(device),
            "params": str(num_params),
            "num_train_rows": str(train_ids_NT.shape[0]),
            "resumed_from_step": str(state.resumed_from_step),
        },
    )
