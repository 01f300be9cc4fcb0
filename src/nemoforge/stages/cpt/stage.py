"""Continued pretraining: causal-LM cross-entropy on the corpus (Llama-Nemotron §2.2, arXiv 2505.00949).

Shape legend: ``B`` batch, ``T`` tokens. Reported: held-out cross-entropy and perplexity before and after.
"""

from __future__ import annotations

import functools

import torch

from nemoforge.artifacts.store import ArtifactStore
from nemoforge.config import Recipe
from nemoforge.stages.result import StageResult
from nemoforge.stages.training import run_training_stage
from nemoforge.training.loop import LogFn
from nemoforge.training.losses import causal_lm_loss


def _lm_loss(
    model: torch.nn.Module, input_ids_BT: torch.Tensor, *, compiled: bool = False
) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean next-token cross-entropy over the batch (nats/token); packed rows, so no padding to mask.

    Chunked over tokens (:func:`~nemoforge.training.losses.causal_lm_loss`): the ``(B, T, V)`` logits are never
    held, which matters at long rows and 128K vocabularies; its softmax is compiled with ``cpt.compile``.
    """
    return causal_lm_loss(model, input_ids_BT, compiled=compiled), {}


def run(
    recipe: Recipe,
    *,
    model_uri: str,
    corpus_uri: str,
    output_uri: str,
    store: ArtifactStore,
    on_log: LogFn | None = None,
) -> StageResult:
    """Continue pretraining the model at ``model_uri`` on the corpus with ``recipe.cpt``.

    Args:
        recipe: the resolved recipe (``cpt`` section; ``dtype`` of the export).
        model_uri: the model to train, e.g. the distill stage's export.
        corpus_uri: the corpus written by the corpus step.
        output_uri: where the checkpoints, the exported model and the plot go.
        store: the artifact store.
        on_log: called as ``on_log(step, metrics)`` while training, every ``cpt.log_every_steps`` updates
            (the runner logs them to the stage's MLflow run); None: only the returned history.

    Returns:
        See :func:`~nemoforge.stages.training.run_training_stage`; ``perplexity_heldout_before``/``_after``.

    Raises:
        InputNotFoundError: an input URI does not exist.
    """
    return run_training_stage(
        "cpt",
        recipe.cpt,
        recipe,
        model_uri=model_uri,
        corpus_uri=corpus_uri,
        output_uri=output_uri,
        store=store,
        loss_fn=functools.partial(_lm_loss, compiled=recipe.cpt.compile),
        on_log=on_log,
    )
