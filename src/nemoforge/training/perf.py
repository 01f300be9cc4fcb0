"""Speed and memory features the training layer applies to a model from outside it.

The model file stays single-device code driven by ``block_configs`` (../shared/STYLE.md §3); this module adds,
for the span of a training run and without changing parameter names (checkpoints and exports are unaffected):

* activation checkpointing of each decoder layer (:func:`training_features`);
* ``torch.compile`` of each decoder layer (:func:`training_features`): layers with the same ``block_configs``
  entry share one compiled graph, so a Puzzle child compiles once per distinct block, not once per layer;
* document masking of packed rows (:func:`mask_packed_documents`): each token attends only to earlier tokens
  of its own document, at positions that restart after every EOS, so a packed row gives each document the
  logits it would get alone.

Shape legend: ``B`` rows, ``T`` tokens per row.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch.utils.hooks import RemovableHandle

from nemoforge.data.packing import document_positions


def document_attention_inputs(
    input_ids_BT: torch.Tensor, eos_token_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-document position ids and the block-diagonal causal mask of packed rows.

    A document ends with its EOS (see :func:`~nemoforge.data.packing.document_positions`).

    Args:
        input_ids_BT: packed rows.
        eos_token_id: the separator used when packing.

    Returns:
        ``(position_ids_BT, mask_B1TT)``: LongTensor positions from 0 in each document, and a boolean mask,
        True where query ``t`` may attend key ``s`` (``s <= t`` and both in the same document), on the
        rows' device.
    """
    position_ids_BT, document_ids_BT = document_positions(input_ids_BT, eos_token_id)
    T = input_ids_BT.shape[1]
    causal_TT = torch.ones(T, T, dtype=torch.bool, device=input_ids_BT.device).tril()
    same_doc_BTT = document_ids_BT[:, :, None] == document_ids_BT[:, None, :]
    return position_ids_BT, (same_doc_BTT & causal_TT)[:, None]


def mask_packed_documents(model: torch.nn.Module, eos_token_id: int) -> RemovableHandle:
    """Make every full-sequence forward of ``model`` attend within documents only, until the handle is removed.

    A forward pre-hook on the decoder trunk (``model.base_model``) fills in ``position_ids`` and a boolean
    ``attention_mask`` from :func:`document_attention_inputs` when the call passes ``input_ids`` and none of
    ``attention_mask``, ``position_ids``, ``past_key_values`` (a cached decode step is left alone). Loss
    functions therefore stay ``model(input_ids_BT)``; apply it to the teacher too when distilling, so both see
    the same documents.

    Args:
        model: a causal LM whose trunk accepts a boolean ``(B, 1, T, T)`` mask (``DeciLMForCausalLM``).
        eos_token_id: the separator used when packing.

    Returns:
        The hook's handle (``handle.remove()`` switches masking off).
    """

    def hook(module, args, kwargs):
        input_ids_BT = kwargs.get("input_ids", args[0] if args else None)
        if input_ids_BT is None or any(
            kwargs.get(k) is not None for k in ("attention_mask", "position_ids", "past_key_values")
        ):
            return None
        position_ids_BT, mask_B1TT = document_attention_inputs(input_ids_BT, eos_token_id)
        return args, {**kwargs, "position_ids": position_ids_BT, "attention_mask": mask_B1TT}

    return model.base_model.register_forward_pre_hook(hook, with_kwargs=True)


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's decoder layers (every ``GradientCheckpointingLayer``, as Llama's and DeciLM's layers are)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


@contextlib.contextmanager
def training_features(
    model: torch.nn.Module, *, activation_checkpointing: bool, compile: bool
) -> Iterator[torch.nn.Module]:
    """Switch activation checkpointing and per-layer ``torch.compile`` on for the ``with`` block, then off.

    Compiling sets each layer's ``forward`` to its compiled version (the parameter names, hence
    ``state_dict`` keys, do not change), so the layer-by-layer loop, the KV cache code and the hooks stay
    eager; leaving the block restores the eager ``forward`` (generation after training is not recompiled per
    length). Checkpointing is non-reentrant (``torch.utils.checkpoint``, ``use_reentrant=False``).

    Args:
        model: a Hugging Face ``PreTrainedModel`` with ``GradientCheckpointingLayer`` decoder layers.
        activation_checkpointing: recompute each layer's activations in the backward.
        compile: compile each layer's forward (inductor).

    Yields:
        ``model``.

    Raises:
        ValueError: activation checkpointing asked of a model that does not support it, or compiling asked of
            a model with no ``GradientCheckpointingLayer`` layers.
    """
    layers = decoder_layers(model)
    if compile and not layers:
        raise ValueError(f"{type(model).__name__} has no GradientCheckpointingLayer decoder layers to compile")
    if activation_checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise ValueError(f"{type(model).__name__} does not support activation checkpointing")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if compile:
        for layer in layers:
            layer.forward = torch.compile(layer.forward)
    try:
        yield model
    finally:
        if compile:
            for layer in layers:
                del layer.forward  # the instance attribute; the class's eager forward shows again
        if activation_checkpointing:
            model.gradient_checkpointing_disable()
