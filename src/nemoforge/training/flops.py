"""Model FLOPs per trained token from ``block_configs``, the accelerator's peak, and MFU.

Convention (PaLM, arXiv 2204.02311 Appendix B; the same count as Megatron-LM and torchtitan): one trained token
costs ``6 * N + 12 * sum_attn(H * Dh) * T`` FLOPs, where

* ``N`` are the parameters that take part in a matrix multiply: every attention and FFN projection, and the LM
  head (an output projection, ``V * D``, counted once even when tied to the input embedding). The input
  embedding lookup, norms and biases do no matrix multiply and are left out. ``6 = 2`` (forward multiply-add)
  ``+ 4`` (backward: gradients of the activations and of the weights).
* the attention term counts ``Q K^T`` and ``A V`` (``2 * 2 * T * H * Dh`` forward per token, times 3 with the
  backward) over the full ``T x T`` score matrix of the sequence length ``T``, in each layer whose attention is
  not ``no_op``; the causal mask's skipped half is still counted, as in the convention. A Puzzle child's FLOPs
  therefore follow its ``block_configs``: a no-op attention removes its projections and its ``T``-term, a
  narrower FFN its ``3 * D * I``.

MFU = achieved model FLOP/s / the device's dense peak FLOP/s (no sparsity), in [0, 1].
"""

from __future__ import annotations

import torch

# Dense (non-sparse) bf16 tensor-core peak in FLOP/s, from the vendor data sheets (SXM parts).
_PEAK_BF16_FLOPS_PER_S = (
    ("H200", 989e12),  # NVIDIA H200 data sheet: 1,979 TFLOPS bf16 with sparsity, 989 dense
    ("H100", 989e12),  # NVIDIA H100 SXM data sheet: 1,979 with sparsity (the PCIe part is lower: 756)
    ("A100", 312e12),  # NVIDIA A100 data sheet: 312 TFLOPS bf16 dense
)


def matmul_params(config) -> int:
    """``N``: parameters in matrix multiplies (projections of every kept sub-block, and the LM head ``V * D``).

    Args:
        config: a ``DeciLMConfig`` (per-layer widths from ``block_configs``) or a ``LlamaConfig`` (every layer the
            same: ``num_key_value_heads`` and ``intermediate_size``).
    """
    D, H, Dh = config.hidden_size, config.num_attention_heads, _head_dim(config)
    total = config.vocab_size * D  # LM head
    for layer_idx in range(config.num_hidden_layers):
        K, I = _kv_heads_and_ffn_width(config, layer_idx)
        if K:
            total += 2 * D * H * Dh + 2 * D * K * Dh  # q, o; k, v
        total += 3 * D * I  # gate, up, down
    return total


def training_flops_per_token(config, seq_len_tokens: int) -> float:
    """Model FLOPs of one trained token (forward + backward), ``6 * N + 12 * sum_attn(H * Dh) * T``.

    Args:
        config: as :func:`matmul_params`.
        seq_len_tokens: ``T``, tokens per training sequence (packed row length).

    Returns:
        FLOPs per token (float).

    Raises:
        ValueError: ``seq_len_tokens`` is not positive.
    """
    if seq_len_tokens < 1:
        raise ValueError(f"seq_len_tokens={seq_len_tokens} must be positive")
    H, Dh = config.num_attention_heads, _head_dim(config)
    num_attention_layers = sum(
        bool(_kv_heads_and_ffn_width(config, i)[0]) for i in range(config.num_hidden_layers)
    )
    return 6.0 * matmul_params(config) + 12.0 * num_attention_layers * H * Dh * seq_len_tokens


def peak_flops_per_s(device: torch.device) -> float | None:
    """Dense bf16 peak FLOP/s of a CUDA device, looked up by its name (H200, H100: 989e12; A100: 312e12).

    Returns:
        None for the CPU or a GPU not in the table (pass a peak from the recipe instead).
    """
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in _PEAK_BF16_FLOPS_PER_S if key in name), None)


def mfu(tokens_per_s: float, flops_per_token: float, peak: float) -> float:
    """Model FLOPs utilization: ``tokens_per_s * flops_per_token / peak`` (fraction, 0..1 when under the peak)."""
    return tokens_per_s * flops_per_token / peak


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _kv_heads_and_ffn_width(config, layer_idx: int) -> tuple[int, int]:
    """(KV heads, FFN width) of one layer; 0 for a no-op sub-block."""
    if getattr(config, "block_configs", None) is not None:
        return config.num_key_value_heads_of(layer_idx), config.intermediate_size_of(layer_idx)
    return config.num_key_value_heads or config.num_attention_heads, config.intermediate_size
