"""Example checkpoints of a parent for speed and serving checks (untrained: only their speed means anything).

An all-parent nemotron-nas export and a heterogeneous child of one parent (no-op attention on some layers but
never layer 0, narrowed FFNs, one no-op FFN), both written by :func:`nemoforge.models.export.export_checkpoint`;
used by ``benchmarks/serve_throughput.py`` and the vLLM parity tests.
"""

from __future__ import annotations

from pathlib import Path

from nemoforge.models.block_configs import block_config
from nemoforge.models.convert import child_from_parent, load_causal_lm
from nemoforge.models.export import export_checkpoint


def heterogeneous_block_configs(config) -> list:
    """A child of ``config``'s all-parent model: no-op attention on two middle layers (never layer 0),
    FFN narrowed to 2/3 of the parent's width on two layers, no-op FFN on one, the rest parent blocks.
    """
    n = config.num_hidden_layers
    hidden = config.hidden_size
    parent_blocks = list(config.block_configs)
    n_heads_in_group = parent_blocks[0].attention.n_heads_in_group
    width = (
        int(round(2 * parent_blocks[0].ffn.ffn_mult * hidden / 3 / 256)) * 256
    )  # parent I, on the 256 grid
    narrow = max(256, (2 * width // 3) // 256 * 256)
    no_attn, narrow_ffn, no_ffn = {n // 3, (2 * n) // 3}, {1, n // 2}, {n - 2}
    blocks = []
    for i, parent in enumerate(parent_blocks):
        if i in no_attn | narrow_ffn | no_ffn:
            blocks.append(
                block_config(
                    None if i in no_attn else n_heads_in_group,
                    None if i in no_ffn else (narrow if i in narrow_ffn else width),
                    hidden,
                )
            )
        else:
            blocks.append(parent)
    assert not blocks[0].attention.no_op, "vLLM crashes on a no-op attention in layer 0"
    return blocks


def export_parent_and_child(parent_dir: Path, out_root: Path) -> tuple[Path, Path]:
    """Write ``out_root/parent`` (all-parent export) and ``out_root/child`` (heterogeneous); reused when present."""
    from transformers import AutoTokenizer

    parent_out, child_out = out_root / "parent", out_root / "child"
    if (parent_out / "config.json").is_file() and (child_out / "config.json").is_file():
        return parent_out, child_out
    tokenizer = AutoTokenizer.from_pretrained(parent_dir)
    parent = load_causal_lm(parent_dir)
    child = child_from_parent(parent, heterogeneous_block_configs(parent.config))
    export_checkpoint(child, tokenizer, child_out)
    export_checkpoint(parent, tokenizer, parent_out)
    return parent_out, child_out
