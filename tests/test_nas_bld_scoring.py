"""Decoupled BLD (Puzzle §3) and replace-1-block scoring (Puzzle §4.2) on the tiny random Llama."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from nemoforge.config import NASConfig
from nemoforge.models.convert import load_causal_lm
from nemoforge.models.hf.modeling_decilm import DeciLMForCausalLM
from nemoforge.stages.nas.bld import distill_layer, normalized_mse, parent_activations
from nemoforge.stages.nas.child import build_child
from nemoforge.stages.nas.library import Variant, build_library
from nemoforge.stages.nas.scoring import parent_pass, score_layer, variant_layer_output


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny matrices: a second OpenMP thread only adds synchronization (and stalls on a shared machine).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def parent(tiny_llama_dir: Path) -> DeciLMForCausalLM:
    return load_causal_lm(tiny_llama_dir)


@pytest.fixture(scope="module")
def library(parent):
    return build_library(parent.config, NASConfig(ffn_intermediate_sizes=[512, 256]))


@pytest.fixture(scope="module")
def calibration_ids() -> torch.Tensor:
    # 256 distinct tokens, so that the held-out calibration tokens resemble the trained ones.
    return torch.randint(0, 256, (16, 64), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def trained(parent, library, calibration_ids):
    """Layer 1's narrow FFNs after 30 BLD steps, and the layer's activations."""
    acts = next(a for a in parent_activations(parent, calibration_ids) if a.layer_idx == 1)
    results = distill_layer(parent, acts, library.ffn_sizes, steps=30, batch_tokens=128, lr=1e-3, seed=0)
    return acts, results


def test_parent_activations_compose_to_the_forward(parent, calibration_ids) -> None:
    acts = list(parent_activations(parent, calibration_ids))
    assert [a.layer_idx for a in acts] == [0, 1, 2, 3]
    for prev, cur in itertools.pairwise(acts):
        assert torch.equal(prev.output_NTD, cur.input_NTD)
    with torch.no_grad():
        hidden = parent(calibration_ids, output_hidden_states=True).hidden_states
    assert torch.allclose(acts[2].output_NTD, hidden[3], atol=1e-5)


def test_normalized_mse_is_one_for_a_removed_block() -> None:
    target = torch.randn(10, 8)
    assert normalized_mse(torch.zeros_like(target), target).item() == pytest.approx(1.0)
    assert normalized_mse(target, target).item() == 0.0


def test_bld_loss_falls_and_weights_change(parent, trained) -> None:
    _acts, results = trained
    assert set(results) == {512, 256}
    parent_mlp = parent.model.layers[1].mlp
    for width, r in results.items():
        assert r.state["gate_proj.weight"].shape == (width, 64)
        assert r.state["down_proj.weight"].shape == (64, width)
        assert len(r.losses) == 30
        assert 0.0 < r.loss_final < r.loss_init < 1.0, (width, r.loss_init, r.loss_final)
        assert sum(r.losses[-5:]) < sum(r.losses[:5])
        # Trained away from the pruned init (the parent's rows at the kept channels).
        assert not torch.allclose(r.state["gate_proj.weight"], parent_mlp.gate_proj.weight[r.channels])
    # The wider FFN starts closer to the parent.
    assert results[512].loss_init < results[256].loss_init


def test_partial_recompute_equals_full_forward_of_replaced_model(parent, library, trained) -> None:
    """Replace-1-block scores from cached layer inputs equal a full forward of the modified model."""
    _, results = trained
    narrow = {w: r.mlp(parent) for w, r in results.items()}
    heldout_ids = torch.randint(0, parent.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(2))
    heldout = parent_pass(parent, heldout_ids)
    with torch.no_grad():
        assert torch.allclose(heldout.probs_NTV, parent(heldout_ids).logits.softmax(-1), atol=1e-6)
        assert heldout.score(parent(heldout_ids).logits)[0] == pytest.approx(0.0, abs=1e-6)
    variants = [v for v in library.variants[1] if not library.is_parent(v)]
    with torch.no_grad():
        outputs = [variant_layer_output(parent, heldout, 1, v, narrow) for v in variants]
        partial = score_layer(parent, heldout, 1, outputs)
    narrow_mlps = [{}, narrow, {}, {}]
    for variant, (kl, lm_loss) in zip(variants, partial, strict=True):
        chosen = [library.parent, variant, library.parent, library.parent]
        model = build_child(parent, library, chosen, narrow_mlps)
        with torch.no_grad():
            full_kl, full_lm = heldout.score(model(heldout_ids).logits)
        assert kl == pytest.approx(full_kl, abs=1e-5), variant
        assert lm_loss == pytest.approx(full_lm, abs=1e-5), variant
        assert kl > 0.0
    # Removing more costs more: no-op FFN vs narrow FFN, at kept attention.
    by_variant = dict(zip(variants, partial, strict=True))
    assert by_variant[Variant(False, 0)][0] > by_variant[Variant(False, 512)][0]


def test_build_child_has_no_tensors_for_no_op(parent, library, trained) -> None:
    _, results = trained
    narrow_mlps = [{}, {w: r.mlp(parent) for w, r in results.items()}, {}, {}]
    chosen = [library.parent, Variant(True, 256), Variant(False, 0), library.parent]
    child = build_child(parent, library, chosen, narrow_mlps)
    names = set(child.state_dict())
    assert not any(n.startswith(("model.layers.1.self_attn", "model.layers.1.input_")) for n in names)
    assert not any(n.startswith(("model.layers.2.mlp", "model.layers.2.post_")) for n in names)
    assert torch.equal(child.model.layers[1].mlp.down_proj.weight, results[256].state["down_proj.weight"])
    assert torch.equal(child.model.layers[3].mlp.up_proj.weight, parent.model.layers[3].mlp.up_proj.weight)
    assert torch.equal(
        child.model.layers[2].self_attn.k_proj.weight, parent.model.layers[2].self_attn.k_proj.weight
    )


def test_score_is_kl_and_cross_entropy(parent) -> None:
    """The logsumexp form of the score equals KL(p || q) and the next-token cross-entropy computed directly."""
    ids = torch.randint(0, parent.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(3))
    heldout = parent_pass(parent, ids)
    logits = 3.0 * torch.randn(2, 12, heldout.probs_NTV.shape[-1], generator=torch.Generator().manual_seed(4))
    kl, lm_loss = heldout.score(logits)
    p = heldout.probs_NTV
    expected_kl = (p * (p.log() - logits.log_softmax(-1))).sum(-1).mean().item()
    expected_ce = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).item()
    assert kl == pytest.approx(expected_kl, rel=1e-4)
    assert lm_loss == pytest.approx(expected_ce, rel=1e-5)
    assert heldout.lm_loss > 0
