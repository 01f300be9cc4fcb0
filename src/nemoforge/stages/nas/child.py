"""The child: solution 1 built from the parent's attention and the BLD-trained FFNs, scored on the held-out rows,
and with ``nas.ffn_fusion`` its attention-free runs fused (FFN Fusion, Llama-Nemotron LN-Ultra §2; ``fusion.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nemoforge.config import FFNFusionConfig
from nemoforge.models.convert import child_from_parent
from nemoforge.models.hf.modeling_decilm import DeciLMForCausalLM, DeciLMMLP
from nemoforge.stages.nas.fusion import ffn_fusion
from nemoforge.stages.nas.library import BlockLibrary, Variant
from nemoforge.stages.nas.scoring import ParentPass


@dataclass(frozen=True)
class Child:
    """The child to export: ``model`` (fused when FFN Fusion ran), its held-out KL to the parent and LM loss; with
    ``nas.ffn_fusion`` on, the fusion's ``fusion_metrics`` (:func:`fusion_step`, without its report and summary),
    ``fusion_report`` (written as ``ffn_fusion.json``) and ``fusion_summary`` (a one-line tag), else ``{}`` and None."""

    model: DeciLMForCausalLM
    kl_div_heldout: float
    lm_loss_heldout: float
    fusion_metrics: dict[str, float]
    fusion_report: dict | None
    fusion_summary: str | None


def child_phase(
    parent: DeciLMForCausalLM,
    library: BlockLibrary,
    chosen: list[Variant],
    narrow_mlps: list[dict[int, DeciLMMLP]],
    heldout: ParentPass,
    fusion: FFNFusionConfig,
) -> Child:
    """Build the child of the chosen variants, score it on the held-out rows and, when ``fusion.enabled``, fuse it."""
    child = build_child(parent, library, chosen, narrow_mlps)
    with torch.no_grad():
        kl_div, lm_loss = heldout.score(child(heldout.input_ids_NT).logits)
    if not fusion.enabled:
        return Child(child, kl_div, lm_loss, {}, None, None)
    fused, metrics = fusion_step(child, heldout, fusion.kl_budget, kl_div, lm_loss)
    report, summary = metrics.pop("report"), metrics.pop("summary")
    return Child(fused, metrics["kl_div_heldout"], metrics["lm_loss_heldout"], metrics, report, summary)


@torch.no_grad()
def build_child(
    parent: DeciLMForCausalLM,
    library: BlockLibrary,
    chosen: list[Variant],
    narrow_mlps: list[dict[int, DeciLMMLP]],
) -> DeciLMForCausalLM:
    """The child of one solution: the parent's embeddings, head and attention; BLD-trained narrow FFNs; no_op
    sub-blocks absent (no modules, no weights)."""
    child = child_from_parent(parent, [library.block_config(v) for v in chosen])
    for i, variant in enumerate(chosen):
        if variant.ffn_size and variant.ffn_size != library.parent_ffn_size:
            child.model.layers[i].mlp.load_state_dict(narrow_mlps[i][variant.ffn_size].state_dict())
    return child.eval()


def fusion_step(
    child: DeciLMForCausalLM, heldout: ParentPass, kl_budget: float, kl_before: float, lm_loss_before: float
) -> tuple[DeciLMForCausalLM, dict]:
    """FFN Fusion of the chosen child (``fusion.ffn_fusion``) on the held-out scoring sequences.

    Returns:
        The (possibly unchanged) child and a dict of metrics: ``kl_div_heldout`` / ``lm_loss_heldout`` after fusion,
        ``kl_div_heldout_unfused`` / ``lm_loss_heldout_unfused`` before, ``ffn_fusion_num_runs_fused``,
        ``ffn_fusion_layers_removed``, ``ffn_fusion_kl_div_vs_unfused``; plus ``report`` (the JSON written as
        ``ffn_fusion.json``, with the KL to the parent before/after) and ``summary`` (a one-line tag).
    """
    fused, report = ffn_fusion(child, heldout.input_ids_NT, kl_budget)
    kl_after, lm_loss_after = kl_before, lm_loss_before
    if fused is not child:
        with torch.no_grad():
            kl_after, lm_loss_after = heldout.score(fused(heldout.input_ids_NT).logits)
    report.update(
        kl_div_heldout_before=kl_before,
        kl_div_heldout_after=kl_after,
        lm_loss_heldout_before=lm_loss_before,
        lm_loss_heldout_after=lm_loss_after,
    )
    runs = [r for r in report["runs"] if r["fused"]]
    summary = "; ".join(
        f"layers {r['start']}-{r['stop'] - 1} -> {r['fused_layer']} (ffn {'+'.join(map(str, r['widths']))}"
        f" = {r['fused_width']})"
        for r in runs
    )
    return fused, {
        "kl_div_heldout": kl_after,
        "lm_loss_heldout": lm_loss_after,
        "kl_div_heldout_unfused": kl_before,
        "lm_loss_heldout_unfused": lm_loss_before,
        "ffn_fusion_num_runs_fused": float(len(runs)),
        "ffn_fusion_layers_removed": float(report["num_layers_before"] - report["num_layers_after"]),
        "ffn_fusion_kl_div_vs_unfused": report["kl_div_fused_vs_child"],
        "report": report,
        "summary": summary or report["status"],
    }
