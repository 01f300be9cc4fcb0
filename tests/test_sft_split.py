"""sft's data split as an artifact: written by sft, read by rl and eval by URI, keyed by its digest."""

from __future__ import annotations

from pathlib import Path

import pytest

from nemoforge.artifacts import open_store
from nemoforge.artifacts.digests import digest_path
from nemoforge.config import load_recipe
from nemoforge.data.sft_split import load_sft_split, read_sft_split, write_sft_split

SMALL = ["sft.num_samples=40"]


def _written(tmp_path: Path, overrides: list[str], name: str) -> tuple[str, str]:
    store = open_store(str(tmp_path / "store"))
    uri = store.join(name, "sft", "data")
    return uri, write_sft_split(load_sft_split(load_recipe("smollm2-135m-demo", SMALL + overrides), store)[1], store, uri)


def test_split_round_trips_and_its_digest_is_the_directory_digest(tmp_path: Path):
    store = open_store(str(tmp_path / "store"))
    train, split = load_sft_split(load_recipe("smollm2-135m-demo", SMALL), store)
    uri = store.join("run-1", "sft", "data")
    digest = write_sft_split(split, store, uri)
    assert digest == digest_path(Path(uri))  # the store's hidden .<name>.sha256 records left out
    assert sorted(p.name for p in Path(uri).glob("[!.]*")) == ["heldout.jsonl", "source.json", "train_prompts.jsonl"]
    assert read_sft_split(store, uri) == split
    # 20 prompts, 10% held out (2), both modes of each; every training chat's prompt is listed once
    assert (len(split.train_prompts), len(split.heldout)) == (18, 4) and len(train) == 36
    assert split.train_prompts == list(dict.fromkeys(s.prompt for s in train))
    assert split.prompts == {s.prompt for s in train} | {s.prompt for s in split.heldout}
    assert split.source.name.startswith("generated://arithmetic?seed=") and split.source.num_samples == 40


def test_digest_follows_what_sft_reads_and_nothing_else(tmp_path: Path):
    """The digest is what rl's and eval's keys see of sft's data: a change of data.arithmetic reaches them."""
    _, base = _written(tmp_path, [], "a")
    assert _written(tmp_path, [], "b")[1] == base  # deterministic
    for change in ("data.arithmetic.max_operand=9", "data.arithmetic.slip_rate=0.1", "sft.num_samples=60", "seed=1"):
        assert _written(tmp_path, [change], change)[1] != base, change
    for change in ("rl.num_prompts=8", "eval.num_problems=3", "sft.steps=50", "data.math_eval_uri=m.jsonl"):
        assert _written(tmp_path, [change], change)[1] == base, change


def test_a_file_source_is_read_again_past_sft_rows(tmp_path: Path, shared_dir: Path):
    gsm8k = shared_dir / "data" / "gsm8k" / "train.jsonl"
    store = open_store(str(tmp_path / "store"))
    _, split = load_sft_split(load_recipe("smollm2-135m-demo", [f"data.sft_uri={gsm8k}", "sft.num_samples=20"]), store)
    assert split.source.name == str(gsm8k) and split.source.sft_uri == str(gsm8k)
    more = split.source.samples(40, seed=0, store=store)  # rl's read: sft's 10 rows, then 10 more
    assert {s.prompt for s in more[:20]} == split.prompts and not {s.prompt for s in more[20:]} & split.prompts


def test_reading_something_else_names_the_uri_and_the_fix(tmp_path: Path):
    from nemoforge.errors import NemoforgeError

    store = open_store(str(tmp_path / "store"))
    uri = store.write_text(store.join("run-1", "sft", "model", "config.json"), "{}")
    with pytest.raises(NemoforgeError, match=r"model is not sft's data split .* re-run sft to write it"):
        read_sft_split(store, uri.rsplit("/", 1)[0])
