"""The nas stage's inputs: the parent and corpus loaded, the block library built, and the key of its phase results.

Each phase result (``bld/``, ``scores/``, ``costs.json`` under the stage's output) carries the key of the recipe's nas
section, the dtype and the inputs (:class:`PhaseStore`), and is reused on a re-run only when the key matches.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AutoTokenizer

from nemoforge.artifacts.store import ArtifactStore
from nemoforge.artifacts.uris import join_uri, relative_uri
from nemoforge.config import Recipe
from nemoforge.data.corpus import CorpusSplits, load_corpus
from nemoforge.models.convert import load_causal_lm
from nemoforge.models.hf.modeling_decilm import DeciLMForCausalLM
from nemoforge.runtime import compute_device, recipe_dtype
from nemoforge.stages.nas.library import BlockLibrary, build_library


@dataclass(frozen=True)
class PhaseStore:
    """Where the stage keeps its resumable results, and the key that says whether they are still valid."""

    store: ArtifactStore
    output_uri: str
    key: str

    def uri(self, *parts: str) -> str:
        return join_uri(self.output_uri, *parts)

    def read(self, *parts: str) -> dict | None:
        """The JSON at ``parts`` when it exists and carries this run's key."""
        uri = self.uri(*parts)
        if not self.store.exists(uri):
            return None
        data = self.store.read_json(uri)
        return data if data.get("key") == self.key else None

    def write(self, data: dict, *parts: str) -> None:
        self.store.write_json(self.uri(*parts), {**data, "key": self.key})


@dataclass(frozen=True)
class NASInputs:
    """What every phase works on: the parent on the compute device, its tokenizer, the corpus, the block library,
    the phase store (keyed), and the calibration (BLD) and held-out (scoring) token rows on the model's device."""

    model: DeciLMForCausalLM
    tokenizer: Any
    corpus: CorpusSplits
    library: BlockLibrary
    phase: PhaseStore
    calibration_ids: torch.Tensor
    heldout_ids: torch.Tensor


def load_inputs(
    recipe: Recipe, *, parent_uri: str, corpus_uri: str, output_uri: str, store: ArtifactStore
) -> NASInputs:
    """Fetch and load the parent and the corpus, build the block library, and key the phase results.

    Raises:
        InputNotFoundError: the parent or corpus URI does not exist.
        RecipeError: an FFN width not below the parent's.
    """
    nas = recipe.nas
    parent_dir = store.fetch(parent_uri)
    # on the pod's GPU when it has one: BLD, scoring and cost timing all run there
    model = load_causal_lm(parent_dir, dtype=recipe_dtype(recipe)).to(compute_device())
    tokenizer = AutoTokenizer.from_pretrained(parent_dir)
    corpus = load_corpus(store.fetch(corpus_uri))
    library = build_library(model.config, nas)
    key_source = {
        "nas": nas.model_dump(mode="json", exclude={"ffn_fusion"}),
        "dtype": recipe.dtype,
        "parent": relative_uri(parent_uri, store.root_uri),  # a moved workdir resumes its phases
        "corpus": corpus.digest,
    }
    phase = PhaseStore(
        store, output_uri, hashlib.sha256(json.dumps(key_source, sort_keys=True).encode()).hexdigest()
    )

    calibration_ids = corpus.train_ids_NT[: nas.bld.num_calibration_sequences].to(model.device)
    heldout_ids = corpus.heldout_ids_NT[: nas.scoring.num_sequences, : nas.scoring.seq_len_tokens].to(model.device)
    return NASInputs(model, tokenizer, corpus, library, phase, calibration_ids, heldout_ids)
