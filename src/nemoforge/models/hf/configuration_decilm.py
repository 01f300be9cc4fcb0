"""Configuration of a heterogeneous Llama decoder in the nemotron-nas (DeciLM) ``block_configs`` schema.

Self-contained: imports only the standard library and ``transformers``. nemoforge copies this file beside
every exported checkpoint and wires it through ``auto_map``, so ``AutoConfig.from_pretrained(dir,
trust_remote_code=True)`` and stock vLLM (``--trust-remote-code``) load it. Written for nemoforge (not a
copy of NVIDIA's remote code); the schema follows the released Llama-Nemotron checkpoints.

Schema (one ``BlockConfig`` per layer, read by attribute as vLLM's ``nemotron_nas.py`` does):

    block.attention.no_op             bool   the layer has no attention sub-block (and no input_layernorm)
    block.attention.n_heads_in_group  int    GQA group size: num_kv_heads = num_attention_heads // n_heads_in_group
    block.ffn.no_op                   bool   the layer has no FFN sub-block (and no post_attention_layernorm)
    block.ffn.ffn_mult                float  FFN width multiplier, see ``ffn_mult_to_intermediate_size``
    block.ffn.intermediate_size       int    FFN width in channels, for a block without ffn_mult (vLLM reads it then)
    *.replace_with_linear             bool   part of the schema, always False: stock vLLM cannot serve it

Sources: Puzzle (arXiv 2411.19146) §3 search space; nemoforge ../shared/reference/recipe.md §3.2-3.4.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from transformers import PreTrainedConfig

# Keys of NVIDIA's schema that nemoforge does not implement. A config may carry them only with their neutral
# value (released checkpoints write e.g. "sparsify": null); anything else raises instead of being dropped.
_NEUTRAL_ATTENTION_KEYS = {
    "sparsify": None,
    "window_length": None,
    "num_sink_tokens": None,
    "use_prefill_window_in_sink_attention": False,
    "unshifted_sink": False,
}
_NEUTRAL_FFN_KEYS = {"sparsify": None}


def ffn_mult_to_intermediate_size(ffn_mult: float, hidden_size: int) -> int:
    """FFN intermediate size of a block: ``round_up(int(2 * ffn_mult * hidden_size / 3), 256)``.

    The same formula as NVIDIA's remote code, vLLM, TensorRT-LLM and Megatron-Core (recipe.md §3.3): truncate to an
    integer first, then round up to the next multiple of 256. Hidden 576: 4.0 -> 1536, 2.666667 -> 1024;
    hidden 4096: 5.25 -> 14336.
    """
    intermediate_size = int(2 * ffn_mult * hidden_size / 3)
    return -(-intermediate_size // 256) * 256


def _split_known(
    known: tuple[str, ...], data: dict[str, Any], neutral: dict[str, Any], where: str
) -> dict[str, Any]:
    kwargs = {}
    for key, value in data.items():
        if key in known:
            kwargs[key] = value
        elif key in neutral and value == neutral[key]:
            continue
        else:
            raise ValueError(
                f"block_configs {where}: unsupported key {key}={value!r} (supported: {sorted(known)})"
            )
    return kwargs


@dataclasses.dataclass
class AttentionConfig:
    """Attention sub-block of one layer: ``no_op`` (removed) or GQA with ``n_heads_in_group`` query heads per KV head.

    Raises:
        ValueError: ``replace_with_linear`` is set, or a GQA block lacks a positive ``n_heads_in_group``.
    """

    no_op: bool = False
    replace_with_linear: bool = False
    n_heads_in_group: int | None = None

    def __post_init__(self) -> None:
        if self.replace_with_linear:
            raise ValueError("attention.replace_with_linear is not supported (stock vLLM cannot serve it)")
        if self.no_op:
            self.n_heads_in_group = None  # canonical form: a removed block carries no width
        elif self.n_heads_in_group is None or int(self.n_heads_in_group) < 1:
            raise ValueError(
                f"attention.n_heads_in_group must be a positive int, got {self.n_heads_in_group!r}"
            )
        else:
            self.n_heads_in_group = int(self.n_heads_in_group)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AttentionConfig:
        return cls(
            **_split_known(
                tuple(f.name for f in dataclasses.fields(cls)), data, _NEUTRAL_ATTENTION_KEYS, "attention"
            )
        )


class FFNConfig:
    """FFN sub-block of one layer: ``no_op`` (removed) or a SwiGLU MLP whose width is given by ``ffn_mult`` and/or
    ``intermediate_size``.

    ``ffn_mult`` is rounded to 6 decimals (as in the released checkpoints); its width is
    ``ffn_mult_to_intermediate_size(ffn_mult, hidden_size)``. ``intermediate_size`` gives the width in channels
    directly (published Nemotron checkpoints do for widths no ``ffn_mult`` reaches). A block given by
    ``intermediate_size`` alone has **no** ``ffn_mult`` attribute: stock vLLM's ``nemotron_nas.py`` reads
    ``ffn.ffn_mult`` when ``hasattr`` finds it, else ``ffn.intermediate_size``. Not a dataclass for that reason
    (a dataclass field always exists); ``to_dict``, ``==`` and ``repr`` cover the keys present. Whether both keys
    agree needs ``hidden_size`` and is checked by :class:`DeciLMConfig`.

    Raises:
        ValueError: ``replace_with_linear`` is set, or a kept block lacks a positive ``ffn_mult`` and a positive
            ``intermediate_size``.
    """

    _KEYS = ("no_op", "replace_with_linear", "ffn_mult", "intermediate_size")

    def __init__(
        self,
        no_op: bool = False,
        replace_with_linear: bool = False,
        ffn_mult: float | None = None,
        intermediate_size: int | None = None,
    ) -> None:
        if replace_with_linear:
            raise ValueError("ffn.replace_with_linear is not supported (stock vLLM cannot serve it)")
        self.no_op = bool(no_op)
        self.replace_with_linear = False
        self.intermediate_size = None
        if self.no_op:
            self.ffn_mult = None  # canonical form: a removed block carries no width
            return
        if ffn_mult is None and intermediate_size is None:
            raise ValueError(
                "ffn.ffn_mult must be a positive float, got None (or give ffn.intermediate_size)"
            )
        if ffn_mult is not None:
            if float(ffn_mult) <= 0:
                raise ValueError(f"ffn.ffn_mult must be a positive float, got {ffn_mult!r}")
            self.ffn_mult = round(float(ffn_mult), 6)
        if intermediate_size is not None:
            if int(intermediate_size) != intermediate_size or int(intermediate_size) < 1:
                raise ValueError(f"ffn.intermediate_size must be a positive int, got {intermediate_size!r}")
            self.intermediate_size = int(intermediate_size)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FFNConfig:
        return cls(**_split_known(cls._KEYS, data, _NEUTRAL_FFN_KEYS, "ffn"))

    def width(self, hidden_size: int) -> int:
        """Intermediate size in channels (0 for ``no_op``): from ``ffn_mult`` when present, else ``intermediate_size``."""
        if self.no_op:
            return 0
        if hasattr(self, "ffn_mult"):
            return ffn_mult_to_intermediate_size(self.ffn_mult, hidden_size)
        return self.intermediate_size

    def to_dict(self) -> dict[str, Any]:
        """The config.json entry: ``intermediate_size`` only when given, ``ffn_mult`` only when present."""
        return {
            k: getattr(self, k)
            for k in self._KEYS
            if hasattr(self, k) and not (k == "intermediate_size" and self.intermediate_size is None)
        }

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FFNConfig) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"FFNConfig({', '.join(f'{k}={v!r}' for k, v in self.to_dict().items())})"


@dataclasses.dataclass
class BlockConfig:
    """One layer of the heterogeneous decoder: its attention and FFN sub-blocks."""

    attention: AttentionConfig
    ffn: FFNConfig

    @classmethod
    def from_dict(cls, data: dict[str, Any] | BlockConfig) -> BlockConfig:
        """Parse ``{"attention": {...}, "ffn": {...}}`` (a config.json entry); a BlockConfig is returned as is."""
        if isinstance(data, BlockConfig):
            return data
        extra = set(data) - {"attention", "ffn"}
        if extra:
            raise ValueError(f"block_configs entry has unsupported keys {sorted(extra)}")
        attention, ffn = data["attention"], data["ffn"]
        return cls(
            attention=attention
            if isinstance(attention, AttentionConfig)
            else AttentionConfig.from_dict(attention),
            ffn=ffn if isinstance(ffn, FFNConfig) else FFNConfig.from_dict(ffn),
        )

    def to_dict(self) -> dict[str, Any]:
        return {"attention": dataclasses.asdict(self.attention), "ffn": self.ffn.to_dict()}


class DeciLMConfig(PreTrainedConfig):
    """A Llama configuration whose layers differ: ``block_configs[i]`` fixes layer ``i``'s attention and FFN.

    Top-level keys are Llama's (``hidden_size``, ``num_attention_heads``, ``rope_parameters``, ...) except
    ``intermediate_size`` and ``num_key_value_heads``, which are per layer and therefore always ``None``.
    ``block_configs`` is held as :class:`BlockConfig` objects (attribute access, as vLLM reads it) and written to
    config.json as plain dicts.

    Raises:
        ValueError: ``block_configs`` has the wrong length or an invalid entry, ``n_heads_in_group`` does not divide
            ``num_attention_heads``, or ``intermediate_size``/``num_key_value_heads`` is given.
    """

    model_type = "nemotron-nas"
    keys_to_ignore_at_inference: ClassVar[list[str]] = ["past_key_values"]

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int | None = None
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    tie_word_embeddings: bool = False
    rope_parameters: dict | None = None
    attention_bias: bool = False
    attention_dropout: float = 0.0
    mlp_bias: bool = False
    block_configs: list | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        if self.intermediate_size is not None or self.num_key_value_heads is not None:
            raise ValueError(
                "DeciLMConfig: intermediate_size and num_key_value_heads are per layer; set them through "
                "block_configs (ffn.ffn_mult, attention.n_heads_in_group) and leave the top-level keys null"
            )
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.block_configs is not None:
            self.block_configs = [BlockConfig.from_dict(b) for b in self.block_configs]
            if len(self.block_configs) != self.num_hidden_layers:
                raise ValueError(
                    f"DeciLMConfig: {len(self.block_configs)} block_configs for {self.num_hidden_layers} layers"
                )
            for i, block in enumerate(self.block_configs):
                group = block.attention.n_heads_in_group
                if group is not None and self.num_attention_heads % group:
                    raise ValueError(
                        f"DeciLMConfig: layer {i} n_heads_in_group={group} does not divide "
                        f"num_attention_heads={self.num_attention_heads}"
                    )
                ffn = block.ffn
                if hasattr(ffn, "ffn_mult") and ffn.intermediate_size is not None:
                    from_mult = ffn_mult_to_intermediate_size(ffn.ffn_mult, self.hidden_size)
                    if from_mult != ffn.intermediate_size:
                        raise ValueError(
                            f"DeciLMConfig: layer {i} ffn gives ffn_mult={ffn.ffn_mult} (intermediate size "
                            f"{from_mult} at hidden size {self.hidden_size}) and intermediate_size="
                            f"{ffn.intermediate_size}, which disagree: give one of them"
                        )
        super().__post_init__(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        output = super().to_dict()
        if self.block_configs is not None:
            output["block_configs"] = [BlockConfig.from_dict(b).to_dict() for b in self.block_configs]
        return output

    def num_key_value_heads_of(self, layer_idx: int) -> int:
        """KV heads of layer ``layer_idx`` (0 when its attention is ``no_op``)."""
        attention = self.block_configs[layer_idx].attention
        return 0 if attention.no_op else self.num_attention_heads // attention.n_heads_in_group

    def intermediate_size_of(self, layer_idx: int) -> int:
        """FFN intermediate size of layer ``layer_idx`` (0 when its FFN is ``no_op``)."""
        return self.block_configs[layer_idx].ffn.width(self.hidden_size)


__all__ = ["AttentionConfig", "BlockConfig", "DeciLMConfig", "FFNConfig", "ffn_mult_to_intermediate_size"]
