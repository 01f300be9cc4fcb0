"""Reasoning-toggle SFT: token-level cross-entropy on assistant tokens of on/off chats, one chat per row.

Llama-Nemotron §3-4 (arXiv 2505.00949): system prompt ``detailed thinking on|off``, on/off samples mixed
in each batch, token-level CE, cosine LR with linear warmup. Shape legend: ``B`` rows, ``T`` tokens.

Written under ``output_uri``: ``checkpoints/step-N/`` (resumable), ``model/`` (the export),
``data/`` (the split rl and eval read: :mod:`~nemoforge.data.sft_split`), ``plots/loss_curve.png``,
``samples/toggle_{before,after}.json`` (held-out generations on/off).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from nemoforge.artifacts import ArtifactStore, join_uri
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
from nemoforge.training.flops import training_flops_per_token
from nemoforge.training.loop import LogFn, epoch_batches, train
from nemoforge.training.losses import causal_lm_loss_BT


def masked_ce_sum_count(
    model: torch.nn.Module, input_ids_BT: torch.Tensor, loss_mask_BT: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token CE (nats) over target tokens whose mask is set, and their count."""
    ce_BT = causal_lm_loss_BT(model(input_ids_BT, use_cache=False).logits, input_ids_BT)
    target_BT = loss_mask_BT[:, 1:].to(ce_BT.dtype)
    return (ce_BT * target_BT).sum(), target_BT.sum()


def sft_loss(model: torch.nn.Module, signed_BT: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean CE per assistant token of the batch (token-level averaging, LN §4); prompts and padding excluded."""
    input_ids_BT, loss_mask_BT = from_signed_ids(signed_BT)
    total, count = masked_ce_sum_count(model, input_ids_BT, loss_mask_BT)
    return total / count.clamp(min=1), {"assistant_tokens": count.item()}


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
        ``sft-train``/``sft-heldout``.

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

    before, replies_before = measure()
    checkpoints_uri = join_uri(output_uri, "checkpoints")
    with tempfile.TemporaryDirectory(prefix="nemoforge-sft-") as tmp:
        work = Path(tmp)
        fetch_latest_checkpoint(store, checkpoints_uri, work / "checkpoints")
        state = train(
            model,
            sft_loss,
            epoch_batches(
                to_signed_ids(train_ids_NT, train_mask_NT), cfg.batch_size, seed=seed_for(recipe, "sft.batches")
            ),
            cfg,
            seed=seed_for(recipe, "sft.train"),
            checkpoint_dir=work / "checkpoints",
            desc="sft",
            on_log=on_log,
            on_checkpoint=checkpoint_uploader(store, checkpoints_uri, cfg.keep_checkpoints),
            flops_per_token=training_flops_per_token(model.config, train_ids_NT.shape[1]),
            peak_flops_per_s=cfg.peak_flops_per_s,
        )
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
