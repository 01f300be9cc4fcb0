"""Packing tokenized documents into fixed-length training rows.

Shape legend: ``N`` packed rows, ``T`` tokens per row (``DataConfig.seq_len_tokens``).

Documents are concatenated with one EOS token after each, and the stream is cut into rows of ``T``
tokens; the last partial row is dropped. A row can therefore hold the tail of one document and the head
of the next. :func:`document_positions` recovers, from the EOS separators alone, the per-document
position ids and document ids a packed-attention kernel needs to keep documents from attending to each
other (e.g. flash-attention's varlen path, or a block-diagonal mask built from ``document_ids_NT``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

import torch


def pack_documents(
    documents: Iterable[Sequence[int]],
    *,
    seq_len_tokens: int,
    eos_token_id: int,
    max_sequences: int | None = None,
) -> torch.Tensor:
    """Concatenate token-id documents with EOS after each and cut the stream into rows.

    ``documents`` is consumed lazily: reading stops as soon as ``max_sequences`` rows are full, so a
    generator over a large corpus is only tokenized as far as needed.

    Args:
        documents: token ids per document (without EOS; one is appended to each).
        seq_len_tokens: ``T``, tokens per row.
        eos_token_id: the separator appended after every document.
        max_sequences: cap on ``N`` (None: every full row).

    Returns:
        ``input_ids_NT`` (LongTensor); ``N`` may be 0 when the documents hold fewer than ``T`` tokens.
    """
    if seq_len_tokens < 1:
        raise ValueError(f"seq_len_tokens={seq_len_tokens} must be positive")
    rows: list[list[int]] = []
    buffer: list[int] = []
    for doc in documents:
        buffer.extend(doc)
        buffer.append(eos_token_id)
        while len(buffer) >= seq_len_tokens:
            rows.append(buffer[:seq_len_tokens])
            del buffer[:seq_len_tokens]
            if max_sequences is not None and len(rows) >= max_sequences:
                return torch.tensor(rows, dtype=torch.long)
    return torch.tensor(rows, dtype=torch.long).reshape(len(rows), seq_len_tokens)


def document_positions(input_ids_NT: torch.Tensor, eos_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-document position ids and document ids of packed rows.

    A new document starts at the start of each row and right after each EOS (the EOS ends the document it
    follows). Example with EOS = 0: row ``[5, 6, 0, 7, 8, 0, 9]`` gives positions ``[0, 1, 2, 0, 1, 2, 0]``
    and document ids ``[0, 0, 0, 1, 1, 1, 2]``.

    Args:
        input_ids_NT: packed rows from :func:`pack_documents`.
        eos_token_id: the separator used when packing.

    Returns:
        ``(position_ids_NT, document_ids_NT)``, both LongTensor; document ids count from 0 in each row.
    """
    is_eos_NT = input_ids_NT == eos_token_id
    # a document starts at t when t == 0 or token t-1 is EOS
    starts_NT = torch.zeros_like(is_eos_NT)
    starts_NT[:, 0] = True
    starts_NT[:, 1:] = is_eos_NT[:, :-1]
    document_ids_NT = torch.cumsum(starts_NT.long(), dim=1) - 1
    t_NT = torch.arange(input_ids_NT.shape[1], device=input_ids_NT.device).expand_as(input_ids_NT)
    # position = t - (index of the latest start at or before t)
    start_index_NT = torch.where(starts_NT, t_NT, torch.zeros_like(t_NT))
    latest_start_NT = torch.cummax(start_index_NT, dim=1).values
    return t_NT - latest_start_NT, document_ids_NT


def token_digest(*ids: torch.Tensor) -> str:
    """sha256 hex of token-id tensors: shape and int64 little-endian values of each, in order."""
    h = hashlib.sha256()
    for tensor in ids:
        t = tensor.detach().to(torch.long).contiguous().cpu()
        h.update(repr(tuple(t.shape)).encode())
        h.update(t.numpy().astype("<i8", copy=False).tobytes())
    return h.hexdigest()


def split_rows(
    input_ids_NT: torch.Tensor, *, heldout_fraction: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic shuffled train/heldout split of packed rows.

    Args:
        input_ids_NT: packed rows, ``N >= 2``.
        heldout_fraction: share of rows held out, rounded, at least 1 and at most ``N - 1``.
        seed: seed of the row permutation.

    Returns:
        ``(train_ids_NT, heldout_ids_NT)``.
    """
    num_rows = input_ids_NT.shape[0]
    if num_rows < 2:
        raise ValueError(f"need at least 2 rows to split, got {num_rows}")
    num_heldout = min(max(1, round(num_rows * heldout_fraction)), num_rows - 1)
    order = torch.randperm(num_rows, generator=torch.Generator().manual_seed(seed))
    heldout = torch.sort(order[:num_heldout]).values
    train = torch.sort(order[num_heldout:]).values
    return input_ids_NT[train].clone(), input_ids_NT[heldout].clone()
