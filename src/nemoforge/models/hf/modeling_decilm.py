"""A heterogeneous Llama decoder driven by ``block_configs`` (the nemotron-nas / DeciLM checkpoint format).

Self-contained: imports only torch, transformers and the sibling ``configuration_decilm`` (copied together beside
every exported checkpoint and loaded through ``auto_map`` with ``trust_remote_code=True``). It is also
nemoforge's own training and inference model. Written for nemoforge, not a copy of NVIDIA's remote code.

Each layer is a Llama layer whose sub-blocks can be switched off or narrowed (Puzzle, arXiv 2411.19146 §3):
attention is ``no_op`` or GQA with its own KV-head count; the FFN is ``no_op`` or a SwiGLU MLP of its own width.
A ``no_op`` sub-block has no module and no weights, its pre-norm included (``self_attn``/``input_layernorm`` or
``mlp``/``post_attention_layernorm`` are ``None``). Weight names are Llama's, so an all-parent model loads a
Llama state dict as is. Attention is ``torch.nn.functional.scaled_dot_product_attention`` (always SDPA).

KV cache: only attention layers own a cache slot; ``attn.cache_idx`` numbers them 0, 1, ... in layer order, so
slot 0 of any cache (``DynamicCache``, or nemoforge's static cache) is the first attention layer and
``cache.get_seq_length()`` is the number of tokens seen even when layer 0's attention is removed.

Shape legend:
    B  batch                         T  query tokens of this forward       S  key/value tokens (cached + new)
    D  hidden_size                   H  query heads                        K  KV heads of the layer
    Dh head_dim                      I  FFN intermediate size of the layer V  vocab_size
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.cache_utils import DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from .configuration_decilm import DeciLMConfig

# RoPE variants whose frequencies are fixed at init (no per-sequence-length update).
_STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


class DeciLMRMSNorm(nn.Module):
    """RMSNorm computed in float32, as Llama's: ``weight * x / sqrt(mean(x^2) + eps)``."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_BTD: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_BTD.dtype
        hidden_BTD = hidden_BTD.to(torch.float32)
        variance_BT1 = hidden_BTD.pow(2).mean(-1, keepdim=True)
        hidden_BTD = hidden_BTD * torch.rsqrt(variance_BT1 + self.variance_epsilon)
        return self.weight * hidden_BTD.to(input_dtype)


class DeciLMRotaryEmbedding(nn.Module):
    """Llama RoPE: cos/sin tables for given positions (``rope_parameters``: default, linear, llama3, yarn).

    Raises:
        ValueError: a RoPE type whose frequencies change with sequence length (dynamic, longrope).
    """

    def __init__(self, config: DeciLMConfig) -> None:
        super().__init__()
        self.config = config
        self.rope_type = config.rope_parameters.get("rope_type", "default")
        if self.rope_type not in _STATIC_ROPE_TYPES:
            raise ValueError(
                f"rope_type {self.rope_type!r} is not supported (supported: {_STATIC_ROPE_TYPES})"
            )
        inv_freq, self.attention_scaling = self.compute_rope_parameters(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("original_inv_freq", inv_freq.clone(), persistent=False)

    @staticmethod
    def compute_default_rope_parameters(config: DeciLMConfig, *args, **kwargs) -> tuple[torch.Tensor, float]:
        """``inv_freq[i] = theta^(-2i/Dh)``, shape (Dh/2,); attention scaling 1.0."""
        dim = config.head_dim
        base = config.rope_parameters["rope_theta"]
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float) / dim))
        return inv_freq, 1.0

    @classmethod
    def compute_rope_parameters(cls, config: DeciLMConfig) -> tuple[torch.Tensor, float]:
        rope_type = config.rope_parameters.get("rope_type", "default")
        if rope_type == "default":
            return cls.compute_default_rope_parameters(config)
        return ROPE_INIT_FUNCTIONS[rope_type](config)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (cos_BTDh, sin_BTDh) in ``x``'s dtype; computed in float32."""
        freqs_BTDh2 = position_ids_BT[..., None].float() * self.inv_freq.to(
            device=x.device, dtype=torch.float
        )
        emb_BTDh = torch.cat((freqs_BTDh2, freqs_BTDh2), dim=-1)
        cos_BTDh = emb_BTDh.cos() * self.attention_scaling
        sin_BTDh = emb_BTDh.sin() * self.attention_scaling
        return cos_BTDh.to(x.dtype), sin_BTDh.to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary_pos_emb(
    q_BHTDh: torch.Tensor, k_BKTDh: torch.Tensor, cos_BTDh: torch.Tensor, sin_BTDh: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate queries and keys by their positions (Llama's half-split RoPE layout)."""
    cos_B1TDh, sin_B1TDh = cos_BTDh.unsqueeze(1), sin_BTDh.unsqueeze(1)
    q_BHTDh = q_BHTDh * cos_B1TDh + _rotate_half(q_BHTDh) * sin_B1TDh
    k_BKTDh = k_BKTDh * cos_B1TDh + _rotate_half(k_BKTDh) * sin_B1TDh
    return q_BHTDh, k_BKTDh


class DeciLMAttention(nn.Module):
    """Grouped-query attention with this layer's own KV-head count (``num_attention_heads // n_heads_in_group``).

    Args:
        config: the model config.
        layer_idx: index of the layer in the model.
        cache_idx: index of this attention among the model's attention layers (its KV-cache slot).
    """

    def __init__(self, config: DeciLMConfig, layer_idx: int, cache_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.cache_idx = cache_idx
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads_of(layer_idx)
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_key_value_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_key_value_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=bias)

    def forward(
        self,
        hidden_BTD: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask_B1TS: torch.Tensor | None = None,
        past_key_values=None,
    ) -> torch.Tensor:
        """Attention output, shape (B, T, D).

        Args:
            hidden_BTD: normed input.
            position_embeddings: (cos_BTDh, sin_BTDh) from ``DeciLMRotaryEmbedding``.
            attention_mask_B1TS: boolean, True = may attend; None = plain causal attention over exactly these T
                tokens (no cache prefix), or a single query token attending to everything cached.
            past_key_values: a cache with ``update(k, v, slot) -> (k_all, v_all)``; None = no cache.

        Raises:
            ValueError: no mask for several query tokens on top of a cache prefix (the caller must build one).
        """
        B, T, _ = hidden_BTD.shape
        q_BHTDh = self.q_proj(hidden_BTD).view(B, T, -1, self.head_dim).transpose(1, 2)
        k_BKTDh = self.k_proj(hidden_BTD).view(B, T, -1, self.head_dim).transpose(1, 2)
        v_BKTDh = self.v_proj(hidden_BTD).view(B, T, -1, self.head_dim).transpose(1, 2)
        q_BHTDh, k_BKTDh = apply_rotary_pos_emb(q_BHTDh, k_BKTDh, *position_embeddings)
        if past_key_values is not None:
            k_BKSDh, v_BKSDh = past_key_values.update(k_BKTDh, v_BKTDh, self.cache_idx)
        else:
            k_BKSDh, v_BKSDh = k_BKTDh, v_BKTDh
        S = k_BKSDh.shape[2]
        if attention_mask_B1TS is None and T > 1 and S != T:
            raise ValueError(f"a causal mask is required for {T} query tokens over {S} keys (cache prefix)")
        out_BHTDh = F.scaled_dot_product_attention(
            q_BHTDh,
            k_BKSDh,
            v_BKSDh,
            attn_mask=attention_mask_B1TS,
            dropout_p=self.attention_dropout if self.training else 0.0,
            is_causal=attention_mask_B1TS is None and T > 1,
            scale=self.scaling,
            enable_gqa=self.num_key_value_heads != self.num_heads,
        )
        return self.o_proj(out_BHTDh.transpose(1, 2).reshape(B, T, -1))


class DeciLMMLP(nn.Module):
    """SwiGLU FFN of width ``intermediate_size``: ``down(act(gate(x)) * up(x))``."""

    def __init__(self, config: DeciLMConfig, intermediate_size: int) -> None:
        super().__init__()
        self.intermediate_size = intermediate_size
        self.gate_proj = nn.Linear(config.hidden_size, intermediate_size, bias=config.mlp_bias)
        self.up_proj = nn.Linear(config.hidden_size, intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(intermediate_size, config.hidden_size, bias=config.mlp_bias)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, hidden_BTD: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(hidden_BTD)) * self.up_proj(hidden_BTD))


class DeciLMDecoderLayer(GradientCheckpointingLayer):
    """One layer: ``h + attn(norm(h))`` then ``h + mlp(norm(h))``; a ``no_op`` sub-block is the identity."""

    def __init__(self, config: DeciLMConfig, layer_idx: int, cache_idx: int | None) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        block = config.block_configs[layer_idx]
        self.input_layernorm = self.self_attn = None
        self.post_attention_layernorm = self.mlp = None
        if not block.attention.no_op:
            self.input_layernorm = DeciLMRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
            self.self_attn = DeciLMAttention(config, layer_idx, cache_idx)
        if not block.ffn.no_op:
            self.post_attention_layernorm = DeciLMRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
            self.mlp = DeciLMMLP(config, config.intermediate_size_of(layer_idx))

    def attention_block(
        self,
        hidden_BTD: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        past_key_values=None,
    ) -> torch.Tensor:
        """Residual attention sub-block, (B, T, D) -> (B, T, D); identity when attention is ``no_op``.

        ``attention_mask`` is the boolean (B, 1, T, S) mask of ``DeciLMModel.build_attention_mask`` or None (causal).
        """
        if self.self_attn is None:
            return hidden_BTD
        attn_BTD = self.self_attn(
            self.input_layernorm(hidden_BTD), position_embeddings, attention_mask, past_key_values
        )
        return hidden_BTD + attn_BTD

    def ffn_block(self, hidden_BTD: torch.Tensor) -> torch.Tensor:
        """Residual FFN sub-block, (B, T, D) -> (B, T, D); identity when the FFN is ``no_op``."""
        if self.mlp is None:
            return hidden_BTD
        return hidden_BTD + self.mlp(self.post_attention_layernorm(hidden_BTD))

    def forward(
        self,
        hidden_BTD: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        past_key_values=None,
    ) -> torch.Tensor:
        hidden_BTD = self.attention_block(hidden_BTD, position_embeddings, attention_mask, past_key_values)
        return self.ffn_block(hidden_BTD)


class DeciLMPreTrainedModel(PreTrainedModel):
    config_class = DeciLMConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules: ClassVar[list[str]] = ["DeciLMDecoderLayer"]
    _skip_keys_device_placement: ClassVar[list[str]] = ["past_key_values"]
    _supports_sdpa = True

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, DeciLMRotaryEmbedding):
            # Non-persistent buffers are not in the checkpoint: recompute them after a meta-device init.
            inv_freq, _ = module.compute_rope_parameters(module.config)
            with torch.no_grad():
                module.inv_freq.copy_(inv_freq)
                module.original_inv_freq.copy_(inv_freq)
        else:
            super()._init_weights(module)


class DeciLMModel(DeciLMPreTrainedModel):
    """Embeddings, the heterogeneous layers and the final norm (no LM head).

    Raises:
        ValueError: ``config.block_configs`` is missing.
    """

    def __init__(self, config: DeciLMConfig) -> None:
        super().__init__(config)
        if config.block_configs is None:
            raise ValueError("DeciLMConfig.block_configs is required (one entry per layer)")
        self.padding_idx = config.pad_token_id
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        layers, num_attention_layers = [], 0
        for layer_idx, block in enumerate(config.block_configs):
            cache_idx = None if block.attention.no_op else num_attention_layers
            num_attention_layers += not block.attention.no_op
            layers.append(DeciLMDecoderLayer(config, layer_idx, cache_idx))
        self.layers = nn.ModuleList(layers)
        self.num_attention_layers = num_attention_layers
        self.norm = DeciLMRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = DeciLMRotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    @staticmethod
    def build_attention_mask(
        attention_mask_BS: torch.Tensor | None,
        num_query_tokens: int,
        num_past_tokens: int,
        device: torch.device,
    ) -> torch.Tensor | None:
        """Boolean (B or 1, 1, T, S) mask, True = may attend, or None when plain causal attention is exact.

        Query ``t`` sits at cache position ``num_past_tokens + t``; it attends key ``s`` when ``s`` is not after
        it and ``attention_mask_BS[:, s]`` is 1. A query always attends itself, so padding rows stay finite.

        Args:
            attention_mask_BS: 2-D padding mask over all S = past + T tokens (1 = token, 0 = padding), or None;
                or a prepared boolean (B, 1, T, S) mask, returned as is (e.g. a CUDA-graph decode step whose
                cache spans a fixed S).
            num_query_tokens: T.
            num_past_tokens: tokens already in the cache.

        Raises:
            ValueError: a 2-D mask whose length is not past + T, or a 4-D mask that is not boolean.
        """
        if attention_mask_BS is not None and attention_mask_BS.dim() == 4:
            if attention_mask_BS.dtype != torch.bool:
                raise ValueError(
                    f"a 4-D attention_mask must be boolean (True = attend), got {attention_mask_BS.dtype}"
                )
            return attention_mask_BS
        T, past = num_query_tokens, num_past_tokens
        S = past + T
        if attention_mask_BS is not None:
            if attention_mask_BS.dim() != 2 or attention_mask_BS.shape[1] != S:
                raise ValueError(
                    f"attention_mask must be 2-D (batch, {S} = past {past} + new {T}), got {tuple(attention_mask_BS.shape)}"
                )
            if bool(attention_mask_BS.all()):
                attention_mask_BS = None
        if attention_mask_BS is None and (past == 0 or T == 1):
            return None
        query_pos_T1 = torch.arange(past, S, device=device)[:, None]
        key_pos_1S = torch.arange(S, device=device)[None, :]
        mask_11TS = (key_pos_1S <= query_pos_T1)[None, None]
        if attention_mask_BS is None:
            return mask_11TS
        mask_B1TS = mask_11TS & attention_mask_BS.bool()[:, None, None, :]
        return mask_B1TS | (key_pos_1S == query_pos_T1)[None, None]

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """Final-normed hidden states (B, T, D); ``hidden_states`` as HF Llama: L + 1 entries, the last one normed.

        Args:
            input_ids: (B, T) token ids, or ``inputs_embeds`` (B, T, D).
            attention_mask: (B, S) padding mask over cached + new tokens (1 = token), a boolean (B, 1, T, S)
                mask used as is, or None.
            position_ids: (B or 1, T); default ``past + arange(T)``.
            past_key_values: a cache (``DynamicCache`` or compatible); created when ``use_cache`` and None.
            use_cache: default ``config.use_cache`` in eval mode, False in training.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache()
        T = inputs_embeds.shape[1]
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=inputs_embeds.device)[None]
        mask_B1TS = self.build_attention_mask(attention_mask, T, past, inputs_embeds.device)

        hidden_BTD = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_BTD, position_ids)
        all_hidden = [hidden_BTD] if output_hidden_states else None
        for layer in self.layers:
            hidden_BTD = layer(
                hidden_BTD,
                position_embeddings=position_embeddings,
                attention_mask=mask_B1TS,
                past_key_values=past_key_values if use_cache else None,
            )
            if output_hidden_states:
                all_hidden.append(hidden_BTD)
        hidden_BTD = self.norm(hidden_BTD)
        if output_hidden_states:
            all_hidden[-1] = hidden_BTD  # as HF Llama: the last entry is the final-normed output
        return BaseModelOutputWithPast(
            last_hidden_state=hidden_BTD,
            past_key_values=past_key_values if use_cache else None,
            hidden_states=tuple(all_hidden) if output_hidden_states else None,
        )


class DeciLMForCausalLM(DeciLMPreTrainedModel, GenerationMixin):
    """``DeciLMModel`` plus the LM head (tied to ``embed_tokens`` when ``config.tie_word_embeddings``)."""

    _tied_weights_keys: ClassVar[dict[str, str]] = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: DeciLMConfig) -> None:
        super().__init__(config)
        self.model = DeciLMModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Next-token logits (B, T', V) for the last ``logits_to_keep`` positions (0 = all); loss when ``labels``.

        ``labels`` (B, T) are the input ids (shifted inside; -100 = ignored); the loss is the mean token
        cross-entropy in nats. Other arguments as ``DeciLMModel.forward``.
        """
        if kwargs.get("output_attentions"):
            raise ValueError("output_attentions is not supported: attention runs in SDPA kernels")
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
        )
        hidden_BTD = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits_BTV = self.lm_head(hidden_BTD[:, keep, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(
                logits=logits_BTV, labels=labels, vocab_size=self.config.vocab_size, **kwargs
            )
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits_BTV,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
        )


__all__ = ["DeciLMForCausalLM", "DeciLMModel", "DeciLMPreTrainedModel"]
