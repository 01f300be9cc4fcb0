"""Global knowledge distillation (GKD) of the Puzzle child from its parent (Puzzle §4.3, arXiv 2411.19146).

Shape legend: ``B`` batch, ``T`` tokens.

The child (student, trained) learns to match the frozen parent (teacher) on the corpus with
``cosine_weight * sum_l (1 - cos(h_child^l, h_parent^l)) + kl_weight * KL(p_parent || q_child)``
(:func:`~nemoforge.training.losses.gkd_loss`; reference/recipe.md §1.4 and §2.7: no LM loss).
Reported: held-out KL(parent || child) and perplexity before and after.
"""

from __future__ import annotations

import torch

from nemoforge.artifacts.store import ArtifactStore
from nemoforge.config import Recipe
from nemoforge.models.block_configs import parent_layers
from nemoforge.runtime import compute_device, recipe_dtype
from nemoforge.stages.result import StageResult
from nemoforge.stages.training import load_teacher, run_training_stage
from nemoforge.training.loop import LogFn
from nemoforge.training.losses import gkd_loss


def run(
    recipe: Recipe,
    *,
    parent_uri: str,
    model_uri: str,
    corpus_uri: str,
    output_uri: str,
    store: ArtifactStore,
    on_log: LogFn | None = None,
) -> StageResult:
    """Distill the model at ``model_uri`` from the parent at ``parent_uri`` with ``recipe.distill``.

    Args:
        recipe: the resolved recipe (``distill`` section, ``dtype``: the teacher's and the export's dtype).
        parent_uri: the parent checkpoint (teacher).
        model_uri: the child checkpoint (student), e.g. the nas stage's export.
        corpus_uri: the corpus written by the corpus step.
        output_uri: where the checkpoints, the exported model and the plot go.
        store: the artifact store.
        on_log: called as ``on_log(step, metrics)`` while training, every ``distill.log_every_steps`` updates
            (the runner logs them to the stage's MLflow run); None: only the returned history.

    Returns:
        See :func:`~nemoforge.stages.training.run_training_stage`; ``kl_div_heldout_before``/``_after`` are
        the mean per-token KL(parent || child) in nats on the held-out rows, ``kl_div_heldout_drop`` (before -
        after, paired over the same rows) with ``_drop_ci_low``/``_drop_ci_high``, its 95% interval.

    Raises:
        InputNotFoundError: an input URI does not exist.
        ValueError: the child's layers do not map onto the parent's (a Puzzle child keeps the parent's layer
            count; an FFN-fused one records the parent layers of each of its layers as ``parent_layers``).
    """
    cfg = recipe.distill
    parent = load_teacher(store.fetch(parent_uri), dtype=recipe_dtype(recipe), device=compute_device())

    def loss_fn(child: torch.nn.Module, input_ids_BT: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        with torch.no_grad():
            parent_out = parent(input_ids_BT, output_hidden_states=True, use_cache=False)
        child_out = child(input_ids_BT, output_hidden_states=True, use_cache=False)
        # hidden_states[0] is the embedding output; [1:] are the L layer outputs (Puzzle sums over layers). A child
        # layer is paired with the parent layer whose output it stands for: the same index in a Puzzle child, the
        # last layer of its run in an FFN-fused one (block_configs.parent_layers).
        ends = [layers[-1] for layers in parent_layers(child.config)]
        if ends[-1] != parent.config.num_hidden_layers - 1:
            raise ValueError(
                f"the child's {len(ends)} layers carry parent layers 0..{ends[-1]}, the parent has "
                f"{parent.config.num_hidden_layers}: layer counts differ"
            )
        paired = [parent_out.hidden_states[1 + j] for j in ends]
        return gkd_loss(
            child_out.logits,
            parent_out.logits,
            child_out.hidden_states[1:],
            paired,
            cosine_weight=cfg.cosine_weight,
            kl_weight=cfg.kl_weight,
            temperature=cfg.temperature,
        )

    return run_training_stage(
        "distill",
        cfg,
        recipe,
        model_uri=model_uri,
        corpus_uri=corpus_uri,
        output_uri=output_uri,
        store=store,
        loss_fn=loss_fn,
        teacher=parent,
        on_log=on_log,
    )
