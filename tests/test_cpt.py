"""cpt stage on a tiny Puzzle child: held-out loss falls; the export reloads; a finished run is not redone."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_distill import put_child, put_corpus

from nemoforge.config import Recipe


def test_cpt_lowers_heldout_loss(tiny_llama_dir: Path, shared_dir: Path, tmp_path: Path):
    from nemoforge.artifacts import open_store
    from nemoforge.models.convert import load_causal_lm
    from nemoforge.stages.cpt import run

    store = open_store(str(tmp_path / "store"))
    corpus_uri = put_corpus(store, shared_dir, tiny_llama_dir, tmp_path)
    model_uri = put_child(store, tiny_llama_dir, tmp_path)  # a nemotron-nas export, as distill hands over
    output_uri = store.join("run-1", "cpt")
    recipe = Recipe(
        name="test",
        cpt={"steps": 6, "batch_size": 4, "lr": 5e-3, "warmup_steps": 1, "checkpoint_every_steps": 4},
    )

    result = run(recipe, model_uri=model_uri, corpus_uri=corpus_uri, output_uri=output_uri, store=store)
    m = result.metrics
    assert m["loss_heldout_after"] < m["loss_heldout_before"] - 0.2, m
    assert m["perplexity_heldout_after"] < m["perplexity_heldout_before"]
    assert "kl_div_heldout_before" not in m and "kl_div_heldout_drop" not in m  # no teacher in cpt
    assert m["loss_heldout_drop"] == pytest.approx(m["loss_heldout_before"] - m["loss_heldout_after"], abs=1e-6)
    assert 0 < m["loss_heldout_drop_ci_low"] <= m["loss_heldout_drop"] <= m["loss_heldout_drop_ci_high"], m
    assert m["train_tokens"] == 6 * 4 * 32
    losses = [v for _, v in result.history["loss"]]
    assert losses[-1] < losses[0]
    assert sorted(p.name for p in (Path(output_uri) / "checkpoints").iterdir()) == ["step-4", "step-6"]

    exported = load_causal_lm(result.outputs["model"])
    with torch.no_grad():
        heldout_BT = torch.load(Path(corpus_uri) / "heldout.pt")[:2]
        from nemoforge.training.losses import causal_lm_loss_BT

        reloaded_loss = causal_lm_loss_BT(exported(heldout_BT).logits, heldout_BT).mean().item()
    assert reloaded_loss < m["loss_heldout_before"] - 0.2  # the export holds the trained weights

    # a re-run after completion resumes at the last step: no training, same export
    again = run(recipe, model_uri=model_uri, corpus_uri=corpus_uri, output_uri=output_uri, store=store)
    assert again.tags["resumed_from_step"] == "6"
    assert again.digests["model"] == result.digests["model"]


def test_a_flipped_byte_in_the_store_stops_resume_and_load(
    tiny_llama_dir: Path, shared_dir: Path, tmp_path: Path
):
    """Issue 16 §3: a stored checkpoint or input model whose bytes changed after upload is refused, naming it."""
    from nemoforge.artifacts import open_store
    from nemoforge.errors import StorageError
    from nemoforge.stages.cpt import run

    def flip_one_byte(path: Path) -> None:
        data = bytearray(path.read_bytes())
        data[-1] ^= 0x01
        path.write_bytes(bytes(data))

    store = open_store(str(tmp_path / "store"))
    corpus_uri = put_corpus(store, shared_dir, tiny_llama_dir, tmp_path)
    model_uri = put_child(store, tiny_llama_dir, tmp_path)
    output_uri = store.join("run-1", "cpt")
    recipe = Recipe(
        name="test", cpt={"steps": 2, "batch_size": 2, "warmup_steps": 1, "checkpoint_every_steps": 2}
    )
    run(recipe, model_uri=model_uri, corpus_uri=corpus_uri, output_uri=output_uri, store=store)

    checkpoint = f"{output_uri}/checkpoints/step-2/model.safetensors"
    flip_one_byte(Path(checkpoint))
    with pytest.raises(
        StorageError, match=f"^{checkpoint} does not verify against the sha256 recorded at upload"
    ):
        run(recipe, model_uri=model_uri, corpus_uri=corpus_uri, output_uri=output_uri, store=store)

    flip_one_byte(Path(model_uri) / "model.safetensors")
    with pytest.raises(StorageError, match=f"^{model_uri}/model.safetensors does not verify"):
        run(
            recipe,
            model_uri=model_uri,
            corpus_uri=corpus_uri,
            output_uri=store.join("run-2", "cpt"),
            store=store,
        )


def test_cpt_metrics_reach_mlflow_while_it_trains(
    tiny_llama_dir: Path, shared_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Issue 15 §5: through the runner, a stage killed after step 2 keeps its points; the resume adds the rest."""
    from mlflow import MlflowClient

    from nemoforge.artifacts import open_store
    from nemoforge.runner.execute import execute_stage
    from nemoforge.stages import training as training_stage

    store = open_store(str(tmp_path / "store"))
    inputs = {
        "model": {"uri": put_child(store, tiny_llama_dir, tmp_path), "digest": "m"},
        "corpus": {"uri": put_corpus(store, shared_dir, tiny_llama_dir, tmp_path), "digest": "c"},
    }
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    recipe = Recipe(
        name="test",
        cpt={"steps": 4, "batch_size": 2, "warmup_steps": 1, "checkpoint_every_steps": 2},
        tracking={"mlflow_uri": tracking_uri},
        storage={"artifact_root": str(tmp_path / "store")},
    )
    uploader = training_stage.checkpoint_uploader

    def killed_after_upload(*args, **kwargs):
        upload = uploader(*args, **kwargs)

        def kill(path: Path) -> None:
            upload(path)
            raise KeyboardInterrupt  # what SIGINT does mid-stage, after the step-2 checkpoint

        return kill

    monkeypatch.setattr(training_stage, "checkpoint_uploader", killed_after_upload)
    with pytest.raises(KeyboardInterrupt):
        execute_stage("cpt", recipe, "run-1", inputs)
    client = MlflowClient(tracking_uri)
    (run,) = client.search_runs(client.get_experiment_by_name("nemoforge").experiment_id, "tags.`nemoforge.stage` = 'cpt'")
    assert run.info.status == "KILLED"
    killed = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in killed] == [1, 2]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "tokens_per_s")] == [1, 2]

    monkeypatch.setattr(training_stage, "checkpoint_uploader", uploader)
    result, _ = execute_stage("cpt", recipe, "run-1", inputs)
    assert result.tags["resumed_from_step"] == "2"
    points = sorted(client.get_metric_history(run.info.run_id, "loss"), key=lambda m: m.step)
    assert [m.step for m in points] == [1, 2, 3, 4]  # the killed attempt's points are not doubled
    assert points[:2] == sorted(killed, key=lambda m: m.step)
    stamps = [m.timestamp for m in points]
    assert stamps == sorted(stamps) and stamps[2] > stamps[1]  # logged as they came, not at one end time
