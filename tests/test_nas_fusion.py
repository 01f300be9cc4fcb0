"""FFN Fusion (arXiv 2503.18908): attention-free runs, exact folding into one wide FFN, scoring, export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from nemoforge.config import load_recipe
from nemoforge.errors import RecipeError
from nemoforge.models.block_configs import block_config, parent_layers
from nemoforge.models.convert import load_causal_lm
from nemoforge.models.export import export_checkpoint
from nemoforge.models.hf.configuration_decilm import DeciLMConfig
from nemoforge.models.hf.modeling_decilm import DeciLMForCausalLM
from nemoforge.stages.nas.fusion import (
    NOTHING_TO_FUSE,
    attention_free_runs,
    ffn_fusion,
    fuse_runs,
    parallel_run,
)

# Hidden 64, 4 heads. Run A = layers 1..4 (FFNs 512, 256, -, 96: fused 864, no ffn_mult reaches it);
# run B = layers 6..7 (256 + 256 = 512 = ffn_mult 12.0); layer 9 is attention-free but alone (nothing to fuse).
WIDTHS = [(2, 256), (None, 512), (None, 256), (None, None), (None, 96), (2, 256), (None, 256), (None, 256),
          (2, 256), (None, 256)]  # fmt: skip


def blocks(widths):
    out = []
    for group, width in widths:
        if width == 96:  # not a multiple of 256: given as intermediate_size
            b = block_config(group, 256, 64)
            b.ffn = type(b.ffn)(intermediate_size=96)
            out.append(b)
        else:
            out.append(block_config(group, width, 64))
    return out


def random_model(widths, vocab_size: int, seed: int = 0) -> DeciLMForCausalLM:
    config = DeciLMConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        num_attention_heads=4,
        num_hidden_layers=len(widths),
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=True,
        initializer_range=0.1,
        block_configs=blocks(widths),
    )
    torch.manual_seed(seed)
    model = DeciLMForCausalLM(config).eval()
    with torch.no_grad():  # non-trivial per-channel norm weights, so that folding them is tested
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight"):
                p.uniform_(0.5, 1.5)
    return model


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir: Path):
    return AutoTokenizer.from_pretrained(tiny_llama_dir)


@pytest.fixture(scope="module")
def child(tokenizer) -> DeciLMForCausalLM:
    return random_model(WIDTHS, len(tokenizer))


@pytest.fixture(scope="module")
def heldout_ids(child) -> torch.Tensor:
    return torch.randint(0, child.config.vocab_size, (3, 32), generator=torch.Generator().manual_seed(1))


def parallel_reference(
    model: DeciLMForCausalLM, runs: list[tuple[int, int]], ids_NT: torch.Tensor
) -> torch.Tensor:
    """Logits of ``model`` with each run computed in parallel form, straight from the unfused layers."""
    hidden = model.model.embed_tokens(ids_NT)
    pos = model.model.rotary_emb(hidden, torch.arange(ids_NT.shape[1])[None])
    i = 0
    while i < model.config.num_hidden_layers:
        run = next((r for r in runs if r[0] == i), None)
        if run:
            hidden, i = parallel_run(model.model.layers[run[0] : run[1]], hidden), run[1]
        else:
            hidden, i = model.model.layers[i](hidden, pos), i + 1
    return model.lm_head(model.model.norm(hidden))


def test_attention_free_runs_are_maximal_and_hold_two_ffns(child) -> None:
    runs = attention_free_runs(child.config)
    assert [(r.start, r.stop, r.ffn_layers, r.widths) for r in runs] == [
        (1, 5, [1, 2, 4], [512, 256, 96]),
        (6, 8, [6, 7], [256, 256]),
    ]
    assert [r.fused_width for r in runs] == [864, 512]


@torch.no_grad()
def test_fused_model_equals_the_parallel_form(child, heldout_ids) -> None:
    runs = attention_free_runs(child.config)
    fused = fuse_runs(child, runs)
    assert [r.fused_layer for r in runs] == [1, 3]
    assert fused.config.num_hidden_layers == 6  # 10 layers, 4 + 2 fused into 2
    ffns = [b.to_dict()["ffn"] for b in fused.config.block_configs]
    assert ffns[1] == {"no_op": False, "replace_with_linear": False, "intermediate_size": 864}
    assert ffns[3] == {"no_op": False, "replace_with_linear": False, "ffn_mult": 12.0}
    assert fused.config.block_configs[1].attention.no_op and fused.config.block_configs[3].attention.no_op
    assert torch.equal(fused.model.layers[1].post_attention_layernorm.weight, torch.ones(64))
    # the parent layers each layer carries (distill pairs hidden states by them); fusing run by run composes
    assert parent_layers(fused.config) == [[0], [1, 2, 3, 4], [5], [6, 7], [8], [9]]
    first = fuse_runs(child, attention_free_runs(child.config)[:1])
    assert parent_layers(first.config) == [[0], [1, 2, 3, 4], [5], [6], [7], [8], [9]]
    assert parent_layers(fuse_runs(first, attention_free_runs(first.config)).config) == parent_layers(fused.config)
    expected = parallel_reference(child, [(1, 5), (6, 8)], heldout_ids)
    torch.testing.assert_close(fused(heldout_ids).logits, expected, rtol=0, atol=1e-5)
    # and the fused model is not the sequential original (fusion is an approximation of it)
    assert not torch.allclose(fused(heldout_ids).logits, child(heldout_ids).logits, atol=1e-3)


@torch.no_grad()
def test_ffn_fusion_scores_selects_within_budget_and_reports(child, heldout_ids) -> None:
    _, everything = ffn_fusion(child, heldout_ids, kl_budget=1e9)
    kls = [r["kl_div"] for r in everything["runs"]]
    assert everything["status"] == "fused" and all(k > 0 for k in kls)
    assert everything["num_layers_before"] == 10 and everything["num_layers_after"] == 6
    assert everything["kl_div_fused_vs_child"] > 0
    print(
        f"\nKL(child || fused) per run {kls}, both runs fused {everything['kl_div_fused_vs_child']:.5f} nats/token"
    )
    # a budget that fits only the cheaper run: fuse it alone; its replace-and-score KL is then the measured KL
    cheap = min(range(2), key=lambda k: kls[k])
    fused, report = ffn_fusion(child, heldout_ids, kl_budget=kls[cheap] * 1.01)
    assert [r["fused"] for r in report["runs"]] == [k == cheap for k in range(2)]
    assert fused.config.num_hidden_layers == (7 if cheap == 0 else 9)
    assert report["kl_div_fused_vs_child"] == pytest.approx(kls[cheap], rel=1e-4)
    # nothing fits: the child passes through unchanged
    same, none = ffn_fusion(child, heldout_ids, kl_budget=0.0)
    assert same is child and none["status"] == "no run fits the budget" and none["num_layers_after"] == 10


def test_parent_layers_default_to_one_each_and_a_bad_map_is_refused() -> None:
    config = DeciLMConfig(
        hidden_size=64, num_attention_heads=4, num_hidden_layers=3, block_configs=blocks([(2, 256)] * 3)
    )
    assert parent_layers(config) == [[0], [1], [2]]
    config.parent_layers = [[0, 1], [2], [3]]
    assert parent_layers(config) == [[0, 1], [2], [3]]
    for bad in ([[0], [1]], [[0], [2], [3]], [[0], [], [1]]):
        config.parent_layers = bad
        with pytest.raises(ValueError, match="parent_layers=.* must give each of the 3 layers"):
            parent_layers(config)


def test_child_without_attention_free_run_passes_through(tokenizer, heldout_ids) -> None:
    model = random_model([(2, 256), (None, 256), (2, 256), (None, None), (None, 256)], len(tokenizer))
    same, report = ffn_fusion(model, heldout_ids, kl_budget=1.0)
    assert same is model and report["status"] == NOTHING_TO_FUSE and report["runs"] == []


@torch.no_grad()
def test_fused_export_reloads_to_the_same_logits(child, tokenizer, heldout_ids, tmp_path: Path) -> None:
    fused = fuse_runs(child, attention_free_runs(child.config))
    out = export_checkpoint(fused, tokenizer, tmp_path / "fused")
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 6 and config["block_configs"][1]["ffn"]["intermediate_size"] == 864
    assert config["parent_layers"] == [[0], [1, 2, 3, 4], [5], [6, 7], [8], [9]]
    logits = fused(heldout_ids).logits
    assert torch.equal(load_causal_lm(out)(heldout_ids).logits, logits)
    remote = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()
    assert not hasattr(remote.config.block_configs[1].ffn, "ffn_mult")  # vLLM then reads intermediate_size
    assert parent_layers(remote.config) == config["parent_layers"]  # a plain attribute of the remote config too
    assert torch.equal(remote(heldout_ids).logits, logits)


def test_ffn_fusion_config_is_off_by_default_and_validated() -> None:
    recipe = load_recipe("smollm2-135m-demo")
    assert recipe.nas.ffn_fusion.enabled is False
    assert load_recipe("smollm2-135m-demo", ["nas.ffn_fusion.kl_budget=0"]).nas.ffn_fusion.kl_budget == 0
    with pytest.raises(RecipeError, match=r"nas\.ffn_fusion\.kl_budget: .*greater than or equal to 0"):
        load_recipe("smollm2-135m-demo", ["nas.ffn_fusion.kl_budget=-0.1"])
    assert recipe.nas.ffn_fusion.in_search is False
    with pytest.raises(RecipeError, match=r"nas\.ffn_fusion: in_search needs nas\.ffn_fusion\.enabled=true"):
        load_recipe("smollm2-135m-demo", ["nas.ffn_fusion.in_search=true"])
    with pytest.raises(RecipeError, match=r"nas: ffn_fusion\.enabled=true needs nas\.enabled=true"):
        load_recipe("smollm2-135m-demo", ["nas.enabled=false", "nas.ffn_fusion.enabled=true"])


def test_cost_model_predicts_the_fused_child() -> None:
    """Measured widths are looked up; a fused (summed) width lies on the line through the measured ones."""
    from nemoforge.stages.nas.cost import CostTable, Latency

    costs = CostTable(
        measurement={"decode_tokens": 10},
        attention=Latency(5.0, 0.5),
        ffn={256: Latency(2.0, 0.2), 512: Latency(3.0, 0.3), 768: Latency(4.0, 0.4)},  # 1 + w / 256 ms
        fixed=Latency(1.0, 0.1),
        parent_measured=Latency(0.0, 0.0),
        attention_param_bytes=0,
        ffn_param_bytes={},
        fixed_param_bytes=0,
        attention_kv_bytes=0,
    )
    assert costs.ffn_latency(512) == Latency(3.0, 0.3)
    fused = costs.ffn_latency(2304)
    assert fused.prefill_ms == pytest.approx(10.0) and fused.decode_ms == pytest.approx(1.0)
    config = DeciLMConfig(
        hidden_size=64,
        num_attention_heads=4,
        num_hidden_layers=4,
        block_configs=blocks([(2, 256), (None, 512), (None, 512), (None, None)]),
    )
    unfused = costs.predicted_config(config)
    assert unfused.prefill_ms == pytest.approx(1 + 5 + 2 + 3 + 3)
    config.block_configs[1:] = blocks([(None, 1024)])
    config.num_hidden_layers = 2
    fused = costs.predicted_config(config)
    assert fused.prefill_ms == pytest.approx(1 + 5 + 2 + 5)  # one intercept saved
    # what a fusion-aware MIP credits per merged FFN (nas.ffn_fusion.in_search): the line's intercept, exactly the
    # cost model's saving here (the measured widths lie on the line)
    saving = costs.fusion_saving()
    assert saving.prefill_ms == pytest.approx(1.0) and saving.decode_ms == pytest.approx(0.1)
    assert unfused.request_ms(10) - fused.request_ms(10) == pytest.approx(saving.request_ms(10))
