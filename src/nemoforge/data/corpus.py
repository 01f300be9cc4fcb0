"""The training corpus: read text, tokenize, pack, split, save; or sample it from the parent.

Shape legend: ``N`` packed rows, ``T`` tokens per row (``DataConfig.seq_len_tokens``), ``B`` batch.

The pipeline's ``corpus`` step calls :func:`prepare_corpus` once; nas, distill and cpt read the result
with ``load_corpus(store.fetch(corpus_uri))``. On disk a corpus is ``train.pt`` and ``heldout.pt``
(LongTensor ``(N, T)``) plus ``corpus.json`` (source URI, sha256 digest of the token ids, rows).

Sources (``DataConfig.corpus_uri``):

- a local ``.txt`` file (documents are separated by blank lines), a ``.jsonl`` file (one record per line,
  text in ``data.text_field``), or a directory holding such files (read recursively, in sorted order);
- ``s3://bucket/key`` of any of the above, fetched through the :class:`~nemoforge.artifacts.store.ArtifactStore`;
- ``hf://NAME`` (optionally ``hf://NAME?config=C&split=S``, default split ``train``): a Hugging Face
  dataset streamed with the ``datasets`` library; needs the network;
- ``None``: a *teacher corpus* sampled from the parent on a fixed list of chat prompts (Puzzle §4.3 trains
  the child on the parent's own distribution when no distillation mix is given).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

import torch
from tqdm.auto import tqdm

from nemoforge.config import DataConfig, TeacherCorpus
from nemoforge.data.packing import pack_documents, split_rows, token_digest
from nemoforge.errors import InputNotFoundError, NemoforgeError
from nemoforge.runtime import compute_device, no_progress

if TYPE_CHECKING:
    from nemoforge.artifacts.store import ArtifactStore

CORPUS_FILES = ("train.pt", "heldout.pt", "corpus.json")
TEXT_SUFFIXES = (".txt", ".jsonl")

TEACHER_PROMPTS: tuple[str, ...] = (
    "Explain how photosynthesis works to a ten-year-old.",
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "What are the main causes of inflation, and how do central banks respond?",
    "Write a Python function that checks whether a string is a palindrome, and explain it.",
    "A train travels 120 km in 1.5 hours. What is its average speed? Show your steps.",
    "Summarize the plot of Romeo and Juliet in a few sentences.",
    "Give me three tips for a productive morning routine.",
    "What is the difference between a virus and a bacterium?",
    "Write a haiku about autumn rain.",
    "How does a binary search work? Give an example.",
    "Describe the water cycle.",
    "What were the main consequences of the printing press in Europe?",
    "Compose a polite email asking a colleague to review a document by Friday.",
    "If I have 3 apples and buy 5 more, then give away 2, how many do I have?",
    "Explain the difference between weather and climate.",
    "What is a prime number? List the first ten primes.",
    "Write a recipe for a simple vegetable soup.",
    "Why is the sky blue?",
    "Explain what a neural network is in plain language.",
    "Give a brief history of the Roman Empire.",
    "What should I consider when adopting a dog?",
    "Translate 'Good morning, how are you?' into French and Spanish.",
    "Write a limerick about a cat who loves computers.",
    "How do vaccines train the immune system?",
    "What is the Pythagorean theorem? Give a worked example.",
    "Describe a sunset over the ocean in vivid detail.",
    "What are the pros and cons of remote work?",
    "Explain recursion with a simple example in code.",
    "How do plants know which way is up?",
    "Write a dialogue between a teacher and a curious student about black holes.",
    "What is the capital of Australia, and why was it chosen?",
    "Suggest a plan to learn a new language in six months.",
)
"""Fixed, diverse chat prompts for the teacher corpus (science, math, code, writing, history, advice)."""


@dataclass(frozen=True)
class CorpusSplits:
    """A packed, split corpus.

    Attributes:
        train_ids_NT: training rows, LongTensor ``(N_train, T)``.
        heldout_ids_NT: held-out rows for KL scoring and evaluation, LongTensor ``(N_heldout, T)``.
        source_uri: where the text came from: a resolved local path, ``s3://``, ``hf://`` or ``teacher://<parent>``.
        digest: sha256 hex of the token ids (train then heldout, see :func:`~nemoforge.data.packing.token_digest`).
    """

    train_ids_NT: torch.Tensor
    heldout_ids_NT: torch.Tensor
    source_uri: str
    digest: str


def prepare_corpus(
    data_cfg: DataConfig,
    *,
    tokenizer: Any,
    parent_dir: Path | None,
    out_dir: Path,
    seed: int,
    store: ArtifactStore | None = None,
) -> CorpusSplits:
    """Read or sample the corpus, tokenize, pack into ``(N, T)`` rows, split and save it to ``out_dir``.

    Documents are tokenized without special tokens and packed with one EOS after each
    (:func:`~nemoforge.data.packing.pack_documents`); reading stops once ``data_cfg.max_sequences`` rows
    are full. The row split is a seeded permutation, so the same inputs give the same digest.

    Args:
        data_cfg: ``recipe.data``.
        tokenizer: the parent's Hugging Face tokenizer (needs ``eos_token_id``; a chat template for the
            teacher corpus).
        parent_dir: the parent's checkpoint directory; sampled from when ``data_cfg.corpus_uri`` is None.
        out_dir: written: ``train.pt``, ``heldout.pt``, ``corpus.json``.
        seed: seed of the teacher sampling and of the split.
        store: artifact store used to fetch ``s3://`` corpora.

    Returns:
        The splits, as :func:`load_corpus` reads them back.

    Raises:
        InputNotFoundError: the corpus path/URI does not exist or holds no .txt/.jsonl file, or an
            ``hf://`` dataset cannot be reached.
        NemoforgeError: a .jsonl record lacks ``data.text_field``, or the corpus is too small for two rows.
    """
    eos_token_id = tokenizer.eos_token_id
    if eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token_id: it is needed to separate packed documents")
    if data_cfg.corpus_uri is None:
        if parent_dir is None:
            raise ValueError(
                "prepare_corpus: parent_dir is required when data.corpus_uri is None (teacher corpus)"
            )
        documents: Iterable[Sequence[int]] = sample_teacher_documents(
            parent_dir, tokenizer, data_cfg.teacher_corpus, seed=seed
        )
        source_uri = f"teacher://{Path(parent_dir).name}"
    else:
        texts, source_uri = read_documents(data_cfg.corpus_uri, text_field=data_cfg.text_field, store=store)
        documents = tokenize_documents(texts, tokenizer)

    rows_NT = pack_documents(
        documents,
        seq_len_tokens=data_cfg.seq_len_tokens,
        eos_token_id=eos_token_id,
        max_sequences=data_cfg.max_sequences,
    )
    if rows_NT.shape[0] < 2:
        raise NemoforgeError(
            f"corpus {source_uri} gives {rows_NT.shape[0]} packed sequence(s) of {data_cfg.seq_len_tokens} tokens; "
            "at least 2 are needed: give more text (or more data.teacher_corpus.num_sequences) "
            "or lower data.seq_len_tokens"
        )
    train_ids_NT, heldout_ids_NT = split_rows(rows_NT, heldout_fraction=data_cfg.heldout_fraction, seed=seed)
    splits = CorpusSplits(
        train_ids_NT=train_ids_NT,
        heldout_ids_NT=heldout_ids_NT,
        source_uri=source_uri,
        digest=token_digest(train_ids_NT, heldout_ids_NT),
    )
    save_corpus(splits, out_dir, seq_len_tokens=data_cfg.seq_len_tokens, eos_token_id=eos_token_id, seed=seed)
    return splits


def save_corpus(splits: CorpusSplits, out_dir: Path, **facts: Any) -> None:
    """Write ``train.pt``, ``heldout.pt`` and (last) ``corpus.json`` with ``facts`` added to it."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save(splits.train_ids_NT, out_dir / "train.pt")
    torch.save(splits.heldout_ids_NT, out_dir / "heldout.pt")
    meta = {
        "source_uri": splits.source_uri,
        "digest": splits.digest,
        "rows": {"train": splits.train_ids_NT.shape[0], "heldout": splits.heldout_ids_NT.shape[0]},
        **facts,
    }
    (out_dir / "corpus.json").write_text(json.dumps(meta, indent=2) + "\n")


def load_corpus(corpus_dir: Path) -> CorpusSplits:
    """Read a corpus written by :func:`prepare_corpus` and check its digest.

    Raises:
        InputNotFoundError: a corpus file is missing.
        NemoforgeError: the token ids do not match the digest in corpus.json (a corrupted copy).
    """
    corpus_dir = Path(corpus_dir)
    for name in CORPUS_FILES:
        if not (corpus_dir / name).is_file():
            raise InputNotFoundError(
                f"corpus {corpus_dir} has no {name}: run the corpus step (prepare_corpus) first"
            )
    meta = json.loads((corpus_dir / "corpus.json").read_text())
    train_ids_NT = torch.load(corpus_dir / "train.pt", weights_only=True)
    heldout_ids_NT = torch.load(corpus_dir / "heldout.pt", weights_only=True)
    digest = token_digest(train_ids_NT, heldout_ids_NT)
    if digest != meta["digest"]:
        raise NemoforgeError(
            f"corpus {corpus_dir}: token ids have sha256 {digest[:12]}..., corpus.json says "
            f"{meta['digest'][:12]}...: the copy is corrupted; re-run the corpus step"
        )
    return CorpusSplits(train_ids_NT, heldout_ids_NT, meta["source_uri"], digest)


# -------------------------------------------------------------------------------------------- readers
def read_documents(
    corpus_uri: str, *, text_field: str = "text", store: ArtifactStore | None = None
) -> tuple[Iterator[str], str]:
    """Open a corpus and return its documents (lazily) and its resolved source URI.

    The source is resolved and checked at once (so a missing path fails here); the documents are read as
    the iterator is consumed.

    Args:
        corpus_uri: a local .txt/.jsonl file or directory, ``s3://...`` or ``hf://NAME[?config=C&split=S]``.
        text_field: field holding the text in .jsonl records (and hf:// rows).
        store: artifact store for ``s3://`` URIs.

    Returns:
        ``(documents, source_uri)``; local paths come back absolute.

    Raises:
        InputNotFoundError: see :func:`prepare_corpus`.
    """
    if corpus_uri.startswith("hf://"):
        return _hf_documents(corpus_uri, text_field), corpus_uri
    if corpus_uri.startswith("s3://"):
        if store is None:
            raise ValueError(
                f"corpus {corpus_uri}: an ArtifactStore is needed to read s3:// URIs (pass store=)"
            )
        path, source_uri = Path(store.fetch(corpus_uri)), corpus_uri
    else:
        path = Path(corpus_uri).expanduser()
        if not path.exists():
            raise InputNotFoundError(
                f"corpus {corpus_uri} does not exist: set data.corpus_uri to a .txt/.jsonl file or directory, "
                "an s3:// or hf:// URI, or null for a corpus sampled from the parent"
            )
        path, source_uri = path.resolve(), str(path.resolve())
    files = _text_files(path, corpus_uri)
    return (doc for file in files for doc in _file_documents(file, text_field)), source_uri


def _text_files(path: Path, corpus_uri: str) -> list[Path]:
    if path.is_file():
        if path.suffix not in TEXT_SUFFIXES:
            raise InputNotFoundError(
                f"corpus {corpus_uri} is a {path.suffix or 'suffix-less'} file: give .txt or .jsonl"
            )
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
    if not files:
        raise InputNotFoundError(f"corpus directory {corpus_uri} holds no .txt or .jsonl file")
    return files


def _file_documents(path: Path, text_field: str) -> Iterator[str]:
    try:
        yield from _decoded_documents(path, text_field)
    except UnicodeDecodeError as err:
        raise NemoforgeError(
            f"{path} is not UTF-8 text (it holds byte 0x{err.object[err.start]:02x}): "
            "convert it (iconv -t UTF-8) or fix data.corpus_uri"
        ) from None


def _decoded_documents(path: Path, text_field: str) -> Iterator[str]:
    if path.suffix == ".txt":
        yield from _txt_documents(path.read_text(encoding="utf-8"))
        return
    with path.open(encoding="utf-8") as lines:
        for line_no, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise NemoforgeError(f"{path}:{line_no} is not valid JSON ({err.msg})") from None
            if not isinstance(record, dict) or text_field not in record:
                keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise NemoforgeError(
                    f"{path}:{line_no} has no field {text_field!r} (it has {keys}): set data.text_field"
                )
            value = record[text_field]
            if not isinstance(value, str):  # str(1) would pass as a document of one token: fail here, not later
                raise NemoforgeError(
                    f"{path}:{line_no} field {text_field!r} is {type(value).__name__} {json.dumps(value)[:40]}, "
                    "not a string: give each row's text as a JSON string"
                )
            text = value.strip()
            if text:
                yield text


def _txt_documents(text: str) -> Iterator[str]:
    """Documents of a plain-text file: blocks separated by one or more blank (or whitespace-only) lines."""
    block: list[str] = []
    for line in text.splitlines():
        if line.strip():
            block.append(line.rstrip())
        elif block:
            yield "\n".join(block)
            block = []
    if block:
        yield "\n".join(block)


def _hf_documents(corpus_uri: str, text_field: str) -> Iterator[str]:
    parts = urlsplit(corpus_uri)
    name = (parts.netloc + parts.path).strip("/")
    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    if not name:
        raise InputNotFoundError(f"corpus {corpus_uri}: expected hf://NAME, e.g. hf://roneneldan/TinyStories")
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        raise InputNotFoundError(
            f"corpus {corpus_uri} needs the Hugging Face Hub, but HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set: "
            "give a local .txt/.jsonl path or an s3:// URI"
        )
    try:
        import datasets
    except ImportError:
        raise InputNotFoundError(
            f"corpus {corpus_uri} needs the `datasets` package (pip install datasets), "
            "or give a local .txt/.jsonl path or an s3:// URI"
        ) from None
    try:
        rows = datasets.load_dataset(
            name, query.get("config"), split=query.get("split", "train"), streaming=True
        )
        first = next(iter(rows))
    except Exception as err:  # the hub reports missing data and network errors in many exception types
        raise InputNotFoundError(
            f"corpus {corpus_uri} could not be opened ({type(err).__name__}: {err}); "
            "hf:// needs network access to the Hugging Face Hub"
        ) from err
    if text_field not in first:
        raise NemoforgeError(
            f"corpus {corpus_uri} rows have no field {text_field!r} ({sorted(first)}): set data.text_field"
        )
    return (str(row[text_field]) for row in rows if str(row[text_field]).strip())


def tokenize_documents(texts: Iterator[str], tokenizer: Any, chunk_size: int = 256) -> Iterator[list[int]]:
    """Token ids per document, without special tokens; tokenized ``chunk_size`` documents at a time."""
    while chunk := list(islice(texts, chunk_size)):
        yield from tokenizer(chunk, add_special_tokens=False)["input_ids"]


# ------------------------------------------------------------------------------------ teacher corpus
def teacher_prompt_ids(tokenizer: Any, num_prompts: int) -> list[list[int]]:
    """The first ``num_prompts`` of :data:`TEACHER_PROMPTS` (cycled) as chat-template token ids."""
    prompts = [TEACHER_PROMPTS[i % len(TEACHER_PROMPTS)] for i in range(num_prompts)]
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
        )
        for p in prompts
    ]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def sample_teacher_documents(
    parent_dir: Path, tokenizer: Any, cfg: TeacherCorpus, *, seed: int
) -> list[list[int]]:
    """Sample ``cfg.num_sequences`` chat exchanges from the parent: prompt ids + sampled reply ids.

    Each sequence starts from one of :data:`TEACHER_PROMPTS` put through the tokenizer's chat template and
    continues with up to ``cfg.new_tokens`` tokens sampled at ``cfg.temperature``/``cfg.top_p``; the reply
    ends at the first EOS (which is dropped: packing appends one). Runs on the GPU when there is one
    (in bfloat16; the samples, and so the corpus digest, then differ from a CPU run's); the parent is
    loaded with :func:`~nemoforge.models.convert.load_causal_lm` and decoded with
    :func:`~nemoforge.models.generate.generate` (KV cache, left padding masked).

    Returns:
        One token-id list per sequence, prompt included.
    """
    from nemoforge.models.convert import load_causal_lm
    from nemoforge.models.generate import generate

    device = compute_device()
    # bf16 on a GPU (fast; sampling is not precision-critical), float32 on the CPU
    model = load_causal_lm(parent_dir, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32).to(
        device
    )
    eos_token_id = tokenizer.eos_token_id
    prompt_ids = teacher_prompt_ids(tokenizer, cfg.num_sequences)
    generator = torch.Generator(device=device).manual_seed(seed)
    documents: list[list[int]] = []
    with torch.no_grad():
        for start in tqdm(
            range(0, len(prompt_ids), cfg.batch_size),
            desc="teacher corpus",
            unit="batch",
            disable=no_progress(),
        ):
            batch = prompt_ids[start : start + cfg.batch_size]
            width = max(len(p) for p in batch)
            # left-pad so every reply starts right after its prompt; the mask hides the padding
            input_ids_BT = torch.tensor([[eos_token_id] * (width - len(p)) + p for p in batch], device=device)
            mask_BT = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device)
            out_BT = generate(
                model,
                input_ids_BT,
                cfg.new_tokens,
                temperature=cfg.temperature,
                top_p=cfg.top_p,
                eos_token_id=eos_token_id,
                generator=generator,
                attention_mask_BT=mask_BT,
            )
            for prompt, reply in zip(batch, out_BT[:, width:].tolist(), strict=True):
                if eos_token_id in reply:
                    reply = reply[: reply.index(eos_token_id)]
                documents.append(prompt + reply)
    return documents
