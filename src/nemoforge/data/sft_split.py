"""sft's data as sft hands it on: the prompts it trained on and the chats it held out, for rl and eval.

sft reads its chats (``data.sft_uri``, or arithmetic generated at ``data.arithmetic``) and splits them by prompt
(:func:`load_sft_split`). rl keeps its prompts apart from every prompt sft saw and draws its own from the same
source, after sft's rows (:attr:`SFTSplit.source`); eval grades sft's held-out problems (unless
``data.math_eval_uri`` is set). Both read this artifact by URI, as they read the model, so their step keys cover
sft's data through its digest instead of re-deriving the split from the recipe.

Written under ``<sft output>/data/`` (:func:`write_sft_split`), JSON lines:

- ``heldout.jsonl``: the held-out chats, one :class:`~nemoforge.data.reasoning.ChatSample` per line (prompt,
  response, reasoning, answer, category), in split order;
- ``train_prompts.jsonl``: the distinct prompts of the training chats, one ``{"prompt": ...}`` per line, in order;
- ``source.json``: where the chats came from (:class:`ChatSource`).

The artifact's digest (:func:`~nemoforge.artifacts.digests.digest_path` of the directory) is the step reference's.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nemoforge.artifacts.digests import digest_path
from nemoforge.artifacts.store import ArtifactStore
from nemoforge.data.reasoning import SFT_HELDOUT_FRACTION, ChatSample, load_chat_samples, split_by_prompt
from nemoforge.errors import NemoforgeError
from nemoforge.runtime import seed_for

if TYPE_CHECKING:
    from nemoforge.config import Recipe

FILES = ("heldout.jsonl", "train_prompts.jsonl", "source.json")


def generated_name(arithmetic: dict[str, Any], seed: int, num_samples: int | None = None) -> str:
    """Lineage name of arithmetic generated at ``arithmetic`` (``data.arithmetic``'s fields) with ``seed``;
    ``num_samples``: how many were generated, when the reader takes a fixed count."""
    style = "".join(f"&{k}={arithmetic[k]}" for k in ("terse_fraction", "slip_rate") if arithmetic.get(k))
    count = "" if num_samples is None else f"&n={num_samples}"
    return (
        f"generated://arithmetic?seed={seed}{count}&steps={arithmetic['num_steps']}"
        f"&max_operand={arithmetic['max_operand']}{style}"
    )


@dataclass(frozen=True)
class ChatSource:
    """Where sft's chats came from, so that rl can draw more of the same.

    Attributes:
        name: the dataset's source name in lineage (``data.sft_uri``, or ``generated://arithmetic?seed=...``).
        sft_uri: the JSONL file (``data.sft_uri``); None: generated arithmetic.
        arithmetic: ``data.arithmetic``'s fields (the generated problems' difficulty and trace style).
        num_samples: chats read (``sft.num_samples``): a file's first rows; further rows are sft's to leave.
    """

    name: str
    sft_uri: str | None
    arithmetic: dict[str, Any]
    num_samples: int

    def samples(self, num_samples: int, *, seed: int, store: ArtifactStore | None) -> list[ChatSample]:
        """``num_samples`` chats of this source: a file's first rows, or problems generated with ``seed``."""
        return load_chat_samples(self.sft_uri, num_samples, seed=seed, store=store, **self.arithmetic)


@dataclass(frozen=True)
class SFTSplit:
    """What rl and eval need of sft's data: every prompt it saw, its held-out chats and their source.

    Attributes:
        train_prompts: the distinct prompts of the training chats, in order.
        heldout: the held-out chats (both modes of each held-out prompt).
        source: where the chats came from.
    """

    train_prompts: list[str]
    heldout: list[ChatSample]
    source: ChatSource

    @property
    def prompts(self) -> set[str]:
        """Every prompt sft saw, trained on or held out."""
        return set(self.train_prompts) | {s.prompt for s in self.heldout}


def load_sft_split(recipe: Recipe, store: ArtifactStore | None) -> tuple[list[ChatSample], SFTSplit]:
    """sft's training chats and its split: ``data.sft_uri`` or generated arithmetic, split by prompt.

    Args:
        recipe: the resolved recipe (``data.sft_uri``, ``data.arithmetic``, ``sft.num_samples``; streams
            ``sft.data``, the generated problems, and ``sft.split`` of its ``seed``).
        store: reads ``data.sft_uri`` when it is a store URI.

    Returns:
        ``(train chats, split)``; :data:`~nemoforge.data.reasoning.SFT_HELDOUT_FRACTION` of the prompts held out.
    """
    data, cfg = recipe.data, recipe.sft
    seed = seed_for(recipe, "sft.data")
    task = data.arithmetic.model_dump()
    name = data.sft_uri or generated_name(task, seed, cfg.num_samples)
    source = ChatSource(name, data.sft_uri, task, cfg.num_samples)
    samples = source.samples(cfg.num_samples, seed=seed, store=store)
    split_seed = seed_for(recipe, "sft.split")
    train, heldout = split_by_prompt(samples, heldout_fraction=SFT_HELDOUT_FRACTION, seed=split_seed)
    return train, SFTSplit(list(dict.fromkeys(s.prompt for s in train)), heldout, source)


def _jsonl(rows: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def write_sft_split(split: SFTSplit, store: ArtifactStore, uri: str) -> str:
    """Write ``split`` under ``uri`` (layout in the module docstring).

    Returns:
        The artifact's digest (sha256 of the directory's files).

    Raises:
        StorageError: the store refuses the upload.
    """
    with tempfile.TemporaryDirectory(prefix="nemoforge-sft-split-") as tmp:
        out = Path(tmp)
        (out / "heldout.jsonl").write_text(_jsonl([dataclasses.asdict(s) for s in split.heldout]))
        (out / "train_prompts.jsonl").write_text(_jsonl([{"prompt": p} for p in split.train_prompts]))
        (out / "source.json").write_text(json.dumps(dataclasses.asdict(split.source), indent=1, sort_keys=True) + "\n")
        digest = digest_path(out)
        store.put(out, uri)
    return digest


def read_sft_split(store: ArtifactStore, uri: str) -> SFTSplit:
    """The split sft wrote under ``uri`` (:func:`write_sft_split`).

    Raises:
        InputNotFoundError: nothing exists at ``uri``.
        NemoforgeError: a file of the split is missing or is not what sft writes.
    """
    path = Path(store.fetch(uri))
    try:
        heldout = [ChatSample(**json.loads(line)) for line in (path / "heldout.jsonl").read_text().splitlines()]
        prompts = [json.loads(line)["prompt"] for line in (path / "train_prompts.jsonl").read_text().splitlines()]
        source = ChatSource(**json.loads((path / "source.json").read_text()))
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise NemoforgeError(
            f"{uri} is not sft's data split ({FILES}): {type(err).__name__}: {err}; re-run sft to write it"
        ) from None
    return SFTSplit(prompts, heldout, source)
