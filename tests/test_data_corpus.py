"""Corpus: packing, readers (txt, jsonl, directory, s3), errors, the teacher corpus."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from nemoforge.config import DataConfig, TeacherCorpus
from nemoforge.data.corpus import (
    TEACHER_PROMPTS,
    load_corpus,
    prepare_corpus,
    read_documents,
    sample_teacher_documents,
    teacher_prompt_ids,
)
from nemoforge.data.packing import document_positions, pack_documents, split_rows, token_digest
from nemoforge.errors import InputNotFoundError, NemoforgeError

SEQ_LEN = 16


# ------------------------------------------------------------------------------------------ packing
def test_pack_documents_appends_eos_and_drops_the_partial_row():
    rows_NT = pack_documents([[1, 2, 3], [4], [5, 6, 7, 8, 9]], seq_len_tokens=4, eos_token_id=0)
    # stream: 1 2 3 0 | 4 0 5 6 | 7 8 9 0 (all full)
    assert rows_NT.tolist() == [[1, 2, 3, 0], [4, 0, 5, 6], [7, 8, 9, 0]]
    assert rows_NT.dtype == torch.long
    capped = pack_documents(
        iter([[1, 2, 3], [4], [5, 6, 7, 8, 9]]), seq_len_tokens=4, eos_token_id=0, max_sequences=2
    )
    assert capped.tolist() == [[1, 2, 3, 0], [4, 0, 5, 6]]
    assert pack_documents([[1]], seq_len_tokens=4, eos_token_id=0).shape == (0, 4)


def test_document_positions_restart_after_eos():
    ids_NT = torch.tensor([[5, 6, 0, 7, 8, 0, 9], [1, 0, 0, 2, 3, 4, 5]])
    position_ids_NT, document_ids_NT = document_positions(ids_NT, eos_token_id=0)
    assert position_ids_NT.tolist() == [[0, 1, 2, 0, 1, 2, 0], [0, 1, 0, 0, 1, 2, 3]]
    assert document_ids_NT.tolist() == [[0, 0, 0, 1, 1, 1, 2], [0, 0, 1, 2, 2, 2, 2]]


def test_split_and_digest_are_deterministic():
    rows_NT = torch.arange(40).reshape(10, 4)
    train_a, held_a = split_rows(rows_NT, heldout_fraction=0.2, seed=3)
    train_b, held_b = split_rows(rows_NT, heldout_fraction=0.2, seed=3)
    assert held_a.shape == (2, 4) and train_a.shape == (8, 4)
    assert torch.equal(train_a, train_b) and torch.equal(held_a, held_b)
    assert sorted(torch.cat([train_a, held_a])[:, 0].tolist()) == list(range(0, 40, 4))  # a partition
    assert token_digest(train_a, held_a) == token_digest(train_b, held_b)
    assert token_digest(train_a, held_a) != token_digest(held_a, train_a)
    _, held_c = split_rows(rows_NT, heldout_fraction=0.2, seed=4)
    assert not torch.equal(held_a, held_c)


# ------------------------------------------------------------------------------------------ readers
@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama_dir)


@pytest.fixture()
def shakespeare_txt(shared_dir: Path, tmp_path: Path) -> Path:
    """The first 3000 bytes of Tiny Shakespeare, cut at a line end."""
    text = (shared_dir / "data/corpus/tinyshakespeare.txt").read_bytes()[:3000].decode("utf-8", "ignore")
    path = tmp_path / "shakespeare.txt"
    path.write_text(text[: text.rindex("\n") + 1])
    return path


def _cfg(corpus_uri: str | None, **kw) -> DataConfig:
    return DataConfig(corpus_uri=corpus_uri, seq_len_tokens=SEQ_LEN, heldout_fraction=0.2, **kw)


def test_txt_documents_split_on_blank_lines(shakespeare_txt: Path):
    docs, source = read_documents(str(shakespeare_txt))
    docs = list(docs)
    assert source == str(shakespeare_txt.resolve())
    assert docs[:3] == [
        "First Citizen:\nBefore we proceed any further, hear me speak.",
        "All:\nSpeak, speak.",
        "First Citizen:\nYou are all resolved rather to die than to famish?",
    ]


def test_txt_jsonl_and_directory_give_the_same_tokens(shakespeare_txt: Path, tmp_path: Path, tokenizer):
    txt = prepare_corpus(
        _cfg(str(shakespeare_txt)), tokenizer=tokenizer, parent_dir=None, out_dir=tmp_path / "a", seed=0
    )
    n_rows = txt.train_ids_NT.shape[0] + txt.heldout_ids_NT.shape[0]
    assert txt.train_ids_NT.shape[1] == txt.heldout_ids_NT.shape[1] == SEQ_LEN
    assert n_rows > 20 and txt.heldout_ids_NT.shape[0] == round(n_rows * 0.2)
    docs = list(read_documents(str(shakespeare_txt))[0])
    # one EOS per document, except the trailing documents that did not fill a whole row
    num_eos = int((torch.cat([txt.train_ids_NT, txt.heldout_ids_NT]) == tokenizer.eos_token_id).sum())
    assert len(docs) - 3 <= num_eos <= len(docs)

    jsonl = tmp_path / "docs" / "shakespeare.jsonl"
    jsonl.parent.mkdir()
    jsonl.write_text("".join(json.dumps({"body": d, "id": i}) + "\n" for i, d in enumerate(docs)))
    from_jsonl = prepare_corpus(
        _cfg(str(jsonl), text_field="body"),
        tokenizer=tokenizer,
        parent_dir=None,
        out_dir=tmp_path / "b",
        seed=0,
    )
    from_dir = prepare_corpus(
        _cfg(str(jsonl.parent), text_field="body"),
        tokenizer=tokenizer,
        parent_dir=None,
        out_dir=tmp_path / "c",
        seed=0,
    )
    assert from_jsonl.digest == from_dir.digest == txt.digest
    assert from_dir.source_uri == str(jsonl.parent.resolve())

    other_seed = prepare_corpus(
        _cfg(str(shakespeare_txt)), tokenizer=tokenizer, parent_dir=None, out_dir=tmp_path / "d", seed=1
    )
    assert other_seed.digest != txt.digest

    loaded = load_corpus(tmp_path / "a")
    assert torch.equal(loaded.train_ids_NT, txt.train_ids_NT) and loaded.digest == txt.digest
    meta = json.loads((tmp_path / "a" / "corpus.json").read_text())
    assert meta["rows"] == {"train": txt.train_ids_NT.shape[0], "heldout": txt.heldout_ids_NT.shape[0]}
    assert meta["source_uri"] == str(shakespeare_txt.resolve())


def test_max_sequences_caps_rows(shakespeare_txt: Path, tmp_path: Path, tokenizer):
    splits = prepare_corpus(
        _cfg(str(shakespeare_txt), max_sequences=10),
        tokenizer=tokenizer,
        parent_dir=None,
        out_dir=tmp_path,
        seed=0,
    )
    assert splits.train_ids_NT.shape[0] + splits.heldout_ids_NT.shape[0] == 10


def test_corrupted_corpus_is_refused(shakespeare_txt: Path, tmp_path: Path, tokenizer):
    prepare_corpus(_cfg(str(shakespeare_txt)), tokenizer=tokenizer, parent_dir=None, out_dir=tmp_path, seed=0)
    train = torch.load(tmp_path / "train.pt")
    train[0, 0] += 1
    torch.save(train, tmp_path / "train.pt")
    with pytest.raises(NemoforgeError, match="corrupted"):
        load_corpus(tmp_path)


def test_missing_inputs_raise_input_not_found(tmp_path: Path, tokenizer):
    missing = tmp_path / "nope.txt"
    with pytest.raises(InputNotFoundError, match=str(missing)):
        prepare_corpus(
            _cfg(str(missing)), tokenizer=tokenizer, parent_dir=None, out_dir=tmp_path / "o", seed=0
        )
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputNotFoundError, match="no .txt or .jsonl"):
        read_documents(str(tmp_path / "empty"))
    with pytest.raises(InputNotFoundError, match="HF_HUB_OFFLINE"):
        read_documents("hf://roneneldan/TinyStories")  # conftest sets HF_HUB_OFFLINE=1
    with pytest.raises(InputNotFoundError, match="no train.pt"):
        load_corpus(tmp_path / "empty")


def test_bad_jsonl_and_tiny_corpus_name_the_fix(tmp_path: Path, tokenizer):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"content": "no text field"}\n')
    with pytest.raises(NemoforgeError, match=r"bad.jsonl:2 has no field 'text'.*data.text_field"):
        list(read_documents(str(bad))[0])
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("just a few words\n")
    with pytest.raises(NemoforgeError, match="at least 2"):
        prepare_corpus(_cfg(str(tiny)), tokenizer=tokenizer, parent_dir=None, out_dir=tmp_path / "o", seed=0)


def test_s3_corpus_through_the_store(shakespeare_txt: Path, tmp_path: Path, tokenizer, monkeypatch):
    moto_server = pytest.importorskip("moto.server")
    import boto3

    from nemoforge.artifacts import open_store

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("NEMOFORGE_CACHE", str(tmp_path / "cache"))
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="corpora")
        store = open_store(str(tmp_path / "artifacts"), s3_endpoint_url=endpoint)
        store.put(shakespeare_txt, "s3://corpora/text/shakespeare.txt")
        from_s3 = prepare_corpus(
            _cfg("s3://corpora/text"),
            tokenizer=tokenizer,
            parent_dir=None,
            out_dir=tmp_path / "s3",
            seed=0,
            store=store,
        )
        local = prepare_corpus(
            _cfg(str(shakespeare_txt)), tokenizer=tokenizer, parent_dir=None, out_dir=tmp_path / "l", seed=0
        )
        assert from_s3.source_uri == "s3://corpora/text"
        assert from_s3.digest == local.digest
        with pytest.raises(InputNotFoundError, match="s3://corpora/missing"):
            read_documents("s3://corpora/missing", store=store)
    finally:
        server.stop()


# ----------------------------------------------------------------------------------- teacher corpus
def test_teacher_corpus_samples_chat_exchanges_from_the_parent(
    tiny_llama_dir: Path, tmp_path: Path, tokenizer
):
    teacher = TeacherCorpus(num_sequences=3, new_tokens=16, batch_size=2)
    docs = sample_teacher_documents(tiny_llama_dir, tokenizer, teacher, seed=0)
    prompts = teacher_prompt_ids(tokenizer, 3)
    assert len(docs) == 3
    for doc, prompt in zip(docs, prompts, strict=True):
        assert doc[: len(prompt)] == prompt  # each exchange starts with its chat-template prompt
        assert len(prompt) < len(doc) <= len(prompt) + 16
        assert tokenizer.eos_token_id not in doc[len(prompt) :]  # replies end before EOS (packing adds it)
    text = tokenizer.decode(docs[1])
    assert TEACHER_PROMPTS[1] in text and "<|im_start|>assistant" in text

    splits = prepare_corpus(
        _cfg(None, teacher_corpus=teacher),
        tokenizer=tokenizer,
        parent_dir=tiny_llama_dir,
        out_dir=tmp_path,
        seed=0,
    )
    assert splits.source_uri == f"teacher://{tiny_llama_dir.name}"
    # same seed, same samples: the digest is that of the documents above, packed and split
    expected_rows = pack_documents(docs, seq_len_tokens=SEQ_LEN, eos_token_id=tokenizer.eos_token_id)
    assert splits.digest == token_digest(*split_rows(expected_rows, heldout_fraction=0.2, seed=0))
    assert load_corpus(tmp_path).source_uri == splits.source_uri
