"""Resolve a recipe against a workdir and check its inputs before any compute.

Every check raises a :class:`~nemoforge.errors.NemoforgeError` whose one-line message names the field
or URI and the fix, so a bad run stops in seconds instead of after the parent has been converted.
"""

from __future__ import annotations

from pathlib import Path

from nemoforge.config import Recipe
from nemoforge.errors import InputNotFoundError, RecipeError


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


def min_latency_ratio(recipe: Recipe, parent_config: dict) -> float:
    """Lower bound on the child/parent latency ratio the NAS search space allows.

    Per-token matmul FLOPs of the cheapest child (layer 0 keeps attention under
    ``keep_first_attention``; every FFN at its narrowest width or removed) over the parent's, including
    the lm_head. Measured latency also pays per-layer overheads the child cannot remove, so the real
    floor is at or above this ratio: a budget below it is infeasible.
    """
    hidden = parent_config["hidden_size"]
    heads = parent_config["num_attention_heads"]
    kv_heads = parent_config.get("num_key_value_heads") or heads
    head_dim = parent_config.get("head_dim") or hidden // heads
    num_layers = parent_config["num_hidden_layers"]
    attn = 2 * (2 * hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim)
    ffn = 2 * 3 * hidden * parent_config["intermediate_size"]
    lm_head = 2 * hidden * parent_config["vocab_size"]
    nas = recipe.nas
    min_ffn = 0 if nas.ffn_no_op else 2 * 3 * hidden * min(nas.ffn_intermediate_sizes)
    min_attn_layers = (1 if nas.keep_first_attention else 0) if nas.attention_no_op else num_layers
    child = lm_head + min_attn_layers * attn + num_layers * min_ffn
    return child / (lm_head + num_layers * (attn + ffn))


def check_budget(recipe: Recipe, parent_config: dict | None) -> None:
    """Reject a latency budget no child in the search space can meet, before any compute.

    Args:
        parent_config: the parent's ``config.json`` as a dict, when it is known before the run
            (an ``hf-dir`` parent or an earlier conversion); ``None`` skips the check, and the nas stage
            checks feasibility right after measuring costs, before any training.

    Raises:
        RecipeError: ``nas.latency_budget_ratio`` is below :func:`min_latency_ratio`.
    """
    if not recipe.nas.enabled or parent_config is None:
        return
    floor = min_latency_ratio(recipe, parent_config)
    if recipe.nas.latency_budget_ratio < floor:
        raise RecipeError(
            f"nas.latency_budget_ratio={recipe.nas.latency_budget_ratio} is below what the block library "
            f"can reach ({floor:.2f} of the parent's FLOPs): raise it to at least {floor:.2f} "
            "or allow no_op blocks / narrower nas.ffn_intermediate_sizes"
        )


def check_inputs(recipe: Recipe) -> None:
    """Check that the parent, the corpus and the artifact store can be reached.

    Raises:
        InputNotFoundError: a local parent directory or corpus path does not exist.
        StorageError: the artifact store (S3 endpoint, bucket) refuses.
    """
    from nemoforge.runner import store_for

    parent = recipe.model.parent
    if parent.source == "hf-dir" and not (Path(parent.path) / "config.json").is_file():
        raise InputNotFoundError(
            f"model.parent.path {parent.path} has no config.json: give a Hugging Face checkpoint directory"
        )
    corpus = recipe.data.corpus_uri
    store = store_for(recipe)
    store.check()
    if corpus and "://" not in corpus and not Path(corpus).exists():
        raise InputNotFoundError(f"data.corpus_uri {corpus} does not exist: give a .txt/.jsonl file or directory")
    if corpus and corpus.startswith("s3://"):
        from nemoforge.artifacts import open_store

        bucket_root = "/".join(corpus.split("/")[:3])
        corpus_store = open_store(
            bucket_root, s3_endpoint_url=recipe.storage.s3_endpoint_url, s3_region=recipe.storage.s3_region
        )
        if not corpus_store.exists(corpus):
            raise InputNotFoundError(f"data.corpus_uri {corpus} does not exist")
