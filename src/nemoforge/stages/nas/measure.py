"""The block library measured, each phase resumable per layer (Puzzle §3, §4.1-4.2, arXiv 2411.19146).

    cost     (§4.1)  latency per sub-block shape timed on the pod's GPU (else CPU); parameter and KV bytes
    BLD      (§3)    each narrow FFN trained on the parent's activations (decoupled, normalized MSE)
    scoring  (§4.2)  replace-1-block KL(parent || model) and LM loss on held-out sequences

Each phase writes its results under the stage's output (``costs.json``, ``bld/``, ``scores/``) with the key of its
inputs (:class:`~nemoforge.stages.nas.inputs.PhaseStore`), and reads back what an earlier run with the same key
finished: an interrupted stage resumes from the last finished layer of the phase it was in.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from nemoforge.config import Recipe
from nemoforge.models.hf.modeling_decilm import DeciLMForCausalLM, DeciLMMLP
from nemoforge.runtime import no_progress, seed_for
from nemoforge.stages.nas.bld import BLDResult, distill_layer, parent_activations
from nemoforge.stages.nas.cost import CostTable, device_name, measure_costs
from nemoforge.stages.nas.inputs import PhaseStore
from nemoforge.stages.nas.library import BlockLibrary, Variant
from nemoforge.stages.nas.scoring import ParentPass, score_layer, variant_layer_output

log = logging.getLogger(__name__)


def cost_phase(model: DeciLMForCausalLM, library: BlockLibrary, recipe: Recipe, phase: PhaseStore) -> CostTable:
    """The cost table, timed where the model is (the pod's GPU when it has one: the target device), else on its CPU.

    A saved table is reused only when it was measured on the same device.
    """
    saved = phase.read("costs.json")
    if saved is not None and saved["measurement"]["device"] == device_name(model.device):
        return CostTable.from_json(saved)
    log.info("nas: timing sub-blocks on %s", device_name(model.device))
    costs = measure_costs(model, library, recipe.nas.cost)
    phase.write(costs.to_json(), "costs.json")
    return costs


def bld_phase(
    model: DeciLMForCausalLM,
    library: BlockLibrary,
    calibration_ids: torch.Tensor,
    recipe: Recipe,
    phase: PhaseStore,
) -> list[dict[int, BLDResult]]:
    """Per layer, the BLD-trained narrow FFNs; layers finished by an earlier run are read back from ``bld/``."""
    cfg = recipe.nas.bld
    results: list[dict[int, BLDResult] | None] = [None] * library.num_layers
    for i in range(library.num_layers):
        meta = phase.read("bld", f"layer-{i:03d}.json")
        if meta is not None:
            tensors = load_file(phase.store.fetch(phase.uri("bld", f"layer-{i:03d}.safetensors")))
            results[i] = {
                int(w): BLDResult(
                    state={
                        k.split(".", 1)[1]: v
                        for k, v in tensors.items()
                        if k.startswith(f"{w}.") and "channels" not in k
                    },
                    channels=tensors[f"{w}.channels"],
                    loss_init=m["loss_init"],
                    loss_final=m["loss_final"],
                    losses=m["losses"],
                )
                for w, m in meta["widths"].items()
            }
    todo = [i for i, r in enumerate(results) if r is None]
    if todo:
        log.info(
            "nas: BLD of %d layers x %d widths on %d calibration tokens",
            len(todo),
            len(library.ffn_sizes),
            calibration_ids.numel(),
        )
        stream = parent_activations(model, calibration_ids)
        for acts in tqdm(stream, total=todo[-1] + 1, desc="nas: BLD", unit="layer", disable=no_progress()):
            i = acts.layer_idx
            if results[i] is None:
                results[i] = distill_layer(
                    model,
                    acts,
                    library.ffn_sizes,
                    steps=cfg.steps,
                    batch_tokens=cfg.batch_tokens,
                    lr=cfg.lr,
                    seed=seed_for(recipe, "nas.bld"),
                )
                _save_bld_layer(phase, i, results[i])
            if i == todo[-1]:
                break
    return results


def _save_bld_layer(phase: PhaseStore, layer_idx: int, results: dict[int, BLDResult]) -> None:
    tensors = {}
    for width, r in results.items():
        tensors.update({f"{width}.{k}": v.contiguous() for k, v in r.state.items()})
        tensors[f"{width}.channels"] = r.channels
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "layer.safetensors"
        save_file(tensors, path)
        phase.store.put(path, phase.uri("bld", f"layer-{layer_idx:03d}.safetensors"))
    widths = {
        str(w): {"loss_init": r.loss_init, "loss_final": r.loss_final, "losses": r.losses}
        for w, r in results.items()
    }
    # Written last: its presence marks the layer done.
    phase.write({"widths": widths}, "bld", f"layer-{layer_idx:03d}.json")


def scoring_phase(
    model: DeciLMForCausalLM,
    library: BlockLibrary,
    heldout: ParentPass,
    narrow_mlps: list[dict[int, DeciLMMLP]],
    phase: PhaseStore,
) -> list[dict[Variant, dict[str, float]]]:
    """Per layer, per variant, ``{"kl_div", "lm_loss"}`` (replace-1-block, Puzzle §4.2); resumable per layer."""
    scores = []
    for i in tqdm(range(library.num_layers), desc="nas: scoring", unit="layer", disable=no_progress()):
        saved = phase.read("scores", f"layer-{i:03d}.json")
        if saved is None:
            variants = [v for v in library.variants[i] if not library.is_parent(v)]
            outputs = [variant_layer_output(model, heldout, i, v, narrow_mlps[i]) for v in variants]
            layer_scores = score_layer(model, heldout, i, outputs)
            saved = {
                "variants": [
                    {
                        "attention_no_op": v.attention_no_op,
                        "ffn_size": v.ffn_size,
                        "kl_div": kl,
                        "lm_loss": lm,
                    }
                    for v, (kl, lm) in zip(variants, layer_scores, strict=True)
                ]
            }
            phase.write(saved, "scores", f"layer-{i:03d}.json")
        row = {library.parent: {"kl_div": 0.0, "lm_loss": heldout.lm_loss}}
        for s in saved["variants"]:
            row[Variant(s["attention_no_op"], s["ffn_size"])] = {
                "kl_div": s["kl_div"],
                "lm_loss": s["lm_loss"],
            }
        scores.append(row)
    return scores
