"""sft stage on the tiny random Llama: assistant-only loss, loss falls, toggle compliance measured, resume."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from nemoforge.config import Recipe


def test_sft_loss_counts_only_masked_tokens_of_the_global_batch(tiny_llama_dir: Path):
    from nemoforge.data.reasoning import to_signed_ids
    from nemoforge.models.convert import load_causal_lm
    from nemoforge.stages.sft.stage import GlobalTokenMean
    from nemoforge.training.losses import causal_lm_loss_BT

    model = load_causal_lm(tiny_llama_dir)
    ids_BT = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]])
    mask_BT = torch.tensor([[0, 0, 0, 1, 1, 0], [0, 0, 0, 0, 0, 1]], dtype=torch.bool)
    objective = GlobalTokenMean(lambda i: to_signed_ids(ids_BT, mask_BT))
    signed_BT = objective.batches(0)
    loss, extra = objective.loss(model, signed_BT)
    ce = causal_lm_loss_BT(model(ids_BT).logits, ids_BT)
    # targets 8 and 9 are predicted at positions 2 and 3 of row 0, 16 at position 4 of row 1: one mean over the 3
    assert torch.allclose(loss, (ce[0, 2] + ce[0, 3] + ce[1, 4]) / 3)
    assert extra["assistant_tokens"] == 3
    # a rank's (or micro-batch's) share: the mean of the halves' losses is the whole batch's, not a mean of means
    halves = [objective.loss(model, half)[0] for half in signed_BT.chunk(2)]
    assert torch.allclose((halves[0] + halves[1]) / 2, loss)


def test_sft_stage_trains_and_measures_toggle(tiny_llama_dir: Path, tmp_path: Path):
    from nemoforge.artifacts import open_store
    from nemoforge.artifacts.digests import digest_path
    from nemoforge.data.sft_split import read_sft_split
    from nemoforge.models.convert import load_causal_lm
    from nemoforge.stages.sft import run

    store = open_store(str(tmp_path / "store"))
    output_uri = store.join("run-1", "sft")
    recipe = Recipe(
        name="test",
        sft={
            "steps": 8, "batch_size": 4, "lr": 3e-3, "warmup_steps": 1, "checkpoint_every_steps": 4,
            "seq_len_tokens": 128, "num_samples": 60, "heldout_sequences": 4, "num_toggle_prompts": 2,
            "max_new_tokens": 8,
        },
    )
    result = run(recipe, model_uri=str(tiny_llama_dir), output_uri=output_uri, store=store)
    m = result.metrics
    assert m["loss_heldout_after"] < m["loss_heldout_before"] - 0.5, m
    for when in ("before", "after"):
        for key in ("toggle_on", "toggle_off", "toggle"):
            assert 0.0 <= m[f"{key}_{when}"] <= 1.0
    assert sorted(p.name for p in (Path(output_uri) / "checkpoints").iterdir()) == ["step-4", "step-8"]
    assert (Path(output_uri) / "samples" / "toggle_after.json").is_file()
    assert {d.name for d in result.datasets} == {"sft-train", "sft-heldout"}
    assert result.tags["num_train_rows"] == "54"  # one chat per row: 30 prompts, 3 held out, on + off each
    load_causal_lm(result.outputs["model"])  # the export reloads
    # the split it hands to rl and eval: what it trained on and held out, with the artifact's digest
    split = read_sft_split(store, result.outputs["data"])
    assert (len(split.train_prompts), len(split.heldout)) == (27, 6)
    toggled = json.loads((Path(output_uri) / "samples" / "toggle_after.json").read_text())
    assert {d["prompt"] for d in toggled} < {s.prompt for s in split.heldout}  # toggle: 2 of the 3 held-out prompts
    assert not set(split.train_prompts) & {s.prompt for s in split.heldout}
    assert result.digests["data"] == digest_path(Path(output_uri) / "data")

    again = run(recipe, model_uri=str(tiny_llama_dir), output_uri=output_uri, store=store)
    assert again.tags["resumed_from_step"] == "8"
    assert again.digests["model"] == result.digests["model"]
