"""distill stage on a tiny parent and a Puzzle child of it: KL to the teacher falls; interrupted runs resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from nemoforge.config import DataConfig, Recipe
from nemoforge.stages.result import StageResult


def put_corpus(store, shared_dir: Path, tokenizer_dir: Path, tmp_path: Path) -> str:
    """A small Tiny Shakespeare corpus (rows of 32 tokens) in the store; returns its URI."""
    from transformers import AutoTokenizer

    from nemoforge.data.corpus import prepare_corpus

    text = (shared_dir / "data/corpus/tinyshakespeare.txt").read_text()[:6000]
    (tmp_path / "text.txt").write_text(text)
    cfg = DataConfig(corpus_uri=str(tmp_path / "text.txt"), seq_len_tokens=32, heldout_fraction=0.25)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    prepare_corpus(cfg, tokenizer=tokenizer, parent_dir=None, out_dir=tmp_path / "corpus", seed=0)
    return store.put(tmp_path / "corpus", store.join("corpus"))


def put_parent(store, tiny_llama_dir: Path, tmp_path: Path) -> str:
    """The tiny random parent with its final norm scaled x20: peaked next-token distributions, as a trained
    model has (a random init's are near uniform, so any child's KL to it is ~0)."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    parent = LlamaForCausalLM.from_pretrained(tiny_llama_dir)
    with torch.no_grad():
        parent.model.norm.weight.mul_(20.0)
    parent.save_pretrained(tmp_path / "parent")
    AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(tmp_path / "parent")
    return store.put(tmp_path / "parent", store.join("parent"))


def put_child(store, parent_dir: Path, tmp_path: Path) -> str:
    """A heterogeneous child of the tiny parent (narrow FFN, no-op attention, no-op FFN), exported to the store."""
    from transformers import AutoTokenizer

    from nemoforge.models.block_configs import block_config
    from nemoforge.models.convert import child_from_parent, load_causal_lm
    from nemoforge.models.export import export_checkpoint

    parent = load_causal_lm(parent_dir)
    blocks = [
        block_config(2, 768, 64),
        block_config(2, 256, 64),
        block_config(None, 768, 64),
        block_config(2, None, 64),
    ]
    child = child_from_parent(parent, blocks)
    export_checkpoint(child, AutoTokenizer.from_pretrained(parent_dir), tmp_path / "child")
    return store.put(tmp_path / "child", store.join("nas", "model"))


def recipe(**sections) -> Recipe:
    return Recipe(name="test", **sections)


class _Crash(Exception):
    pass


def test_distill_lowers_kl_and_resumes_after_a_crash(
    tiny_llama_dir: Path, shared_dir: Path, tmp_path: Path, monkeypatch
):
    from nemoforge.artifacts import open_store
    from nemoforge.models.convert import load_causal_lm
    from nemoforge.stages.distill import run

    store = open_store(str(tmp_path / "store"))
    corpus_uri = put_corpus(store, shared_dir, tiny_llama_dir, tmp_path)
    parent_uri = put_parent(store, tiny_llama_dir, tmp_path)
    model_uri = put_child(store, Path(parent_uri), tmp_path)
    output_uri = store.join("run-1", "distill")
    r = recipe(
        distill={"steps": 8, "batch_size": 4, "lr": 4e-4, "warmup_steps": 1, "checkpoint_every_steps": 3}
    )

    # the first attempt dies while uploading step 6's checkpoint: only step-3 reaches the store
    real_put = store.put

    def put_then_crash(local_path, uri):
        if uri.endswith("checkpoints/step-6"):
            raise _Crash
        return real_put(local_path, uri)

    monkeypatch.setattr(store, "put", put_then_crash)
    with pytest.raises(_Crash):
        run(
            r,
            parent_uri=parent_uri,
            model_uri=model_uri,
            corpus_uri=corpus_uri,
            output_uri=output_uri,
            store=store,
        )
    monkeypatch.setattr(store, "put", real_put)
    checkpoints = Path(output_uri) / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-3"]
    (checkpoints / "step-7").mkdir()  # a half-uploaded later checkpoint must be skipped
    (checkpoints / "step-7" / "model.safetensors").write_bytes(b"partial")

    result: StageResult = run(
        r,
        parent_uri=parent_uri,
        model_uri=model_uri,
        corpus_uri=corpus_uri,
        output_uri=output_uri,
        store=store,
    )
    assert result.tags["resumed_from_step"] == "3"
    m = result.metrics
    assert m["train_steps"] == 8
    assert m["kl_div_heldout_after"] < 0.8 * m["kl_div_heldout_before"], m
    assert m["kl_div_heldout_before"] > 0
    # the drop is paired over the same held-out rows, with its interval clustered by row
    for name in ("kl_div_heldout", "loss_heldout"):
        assert m[f"{name}_drop"] == pytest.approx(m[f"{name}_before"] - m[f"{name}_after"], abs=1e-6)
        assert m[f"{name}_drop_ci_low"] <= m[f"{name}_drop"] <= m[f"{name}_drop_ci_high"]
    assert m["kl_div_heldout_drop_ci_low"] > 0, m  # distillation lowered the KL beyond the rows' noise
    assert (checkpoints / "step-8" / "meta.json").is_file()
    # history spans the whole run: steps 1-3 restored from the checkpoint, 4-8 trained now
    assert [s for s, _ in result.history["loss"]] == list(range(1, 9))
    assert {"loss_cosine", "loss_kl", "lr", "grad_norm", "tokens_per_s"} <= set(result.history)
    assert result.tags["block_configs"] == "attn 3/4, ffn {768: 2, 256: 1, no_op: 1}"
    assert [d.context for d in result.datasets] == ["training", "validation"]

    # the export reloads with the trained weights, and the plot is a PNG
    exported = load_causal_lm(result.outputs["model"])
    assert (
        json.loads((Path(result.outputs["model"]) / "config.json").read_text())["model_type"]
        == "nemotron-nas"
    )
    before = load_causal_lm(model_uri)
    assert not torch.equal(
        exported.model.layers[1].mlp.down_proj.weight, before.model.layers[1].mlp.down_proj.weight
    )
    assert Path(result.plots["loss_curve"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from nemoforge.artifacts.digests import digest_path

    assert result.digests["model"] == digest_path(result.outputs["model"])


def test_distill_pairs_an_ffn_fused_child_with_the_parent_layer_ending_each_run(
    tiny_llama_dir: Path, shared_dir: Path, tmp_path: Path
):
    """FFN Fusion removes layers; the child's config records the parent layers each layer carries
    (``parent_layers``), and distill pairs a fused block with the parent's output after its run's last layer, so
    a fused child distills (the KL falls) instead of failing on the layer count."""
    from transformers import AutoTokenizer

    from nemoforge.artifacts import open_store
    from nemoforge.models.block_configs import block_config, parent_layers
    from nemoforge.models.convert import child_from_parent, load_causal_lm
    from nemoforge.models.export import export_checkpoint
    from nemoforge.stages.distill import run
    from nemoforge.stages.nas.fusion import attention_free_runs, fuse_runs

    store = open_store(str(tmp_path / "store"))
    corpus_uri = put_corpus(store, shared_dir, tiny_llama_dir, tmp_path)
    parent_uri = put_parent(store, tiny_llama_dir, tmp_path)
    parent = load_causal_lm(parent_uri)
    blocks = [block_config(2, 768, 64), block_config(None, 768, 64), block_config(None, 256, 64), block_config(2, 768, 64)]
    fused = fuse_runs(child_from_parent(parent, blocks), attention_free_runs(child_from_parent(parent, blocks).config))
    assert parent_layers(fused.config) == [[0], [1, 2], [3]]
    export_checkpoint(fused, AutoTokenizer.from_pretrained(parent_uri), tmp_path / "fused")
    model_uri = store.put(tmp_path / "fused", store.join("nas", "model"))
    r = recipe(distill={"steps": 6, "batch_size": 4, "lr": 4e-4, "warmup_steps": 1, "checkpoint_every_steps": 6})

    result = run(
        r, parent_uri=parent_uri, model_uri=model_uri, corpus_uri=corpus_uri, output_uri=store.join("d"), store=store
    )
    m = result.metrics
    assert m["kl_div_heldout_after"] < m["kl_div_heldout_before"], m
    exported = load_causal_lm(result.outputs["model"])
    assert exported.config.num_hidden_layers == 3 and parent_layers(exported.config) == [[0], [1, 2], [3]]
    print(f"\ndistill of a fused child: KL {m['kl_div_heldout_before']:.4f} -> {m['kl_div_heldout_after']:.4f}")

    # a map that does not end at the parent's last layer is refused, naming both counts
    broken = load_causal_lm(model_uri)
    broken.config.parent_layers = [[0], [1], [2]]
    export_checkpoint(broken, AutoTokenizer.from_pretrained(parent_uri), tmp_path / "broken")
    with pytest.raises(ValueError, match=r"3 layers carry parent layers 0\.\.2, the parent has 4"):
        run(
            r,
            parent_uri=parent_uri,
            model_uri=store.put(tmp_path / "broken", store.join("broken")),
            corpus_uri=corpus_uri,
            output_uri=store.join("d2"),
            store=store,
        )
