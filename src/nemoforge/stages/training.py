"""What the training stages (distill, cpt; sft and rl in part) share around :func:`~nemoforge.training.loop.train`.

:func:`run_training_stage` is a stage's whole body except its loss: fetch the corpus and the model
(:func:`load_student`), score the held-out rows before, restore the newest checkpoint from the store, train
(uploading each checkpoint), score again, export the model (:func:`export_model`, which sft and rl share),
upload it with a loss-curve plot, and assemble the :class:`~nemoforge.stages.result.StageResult`
(:func:`training_report`). Everything is written under ``output_uri``::

    <output_uri>/checkpoints/step-N/   resumable training state (train's checkpoint layout)
    <output_uri>/model/                the exported nemotron-nas checkpoint (outputs["model"])
    <output_uri>/plots/loss_curve.png
"""

from __future__ import annotations

import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure

from nemoforge.artifacts.digests import digest_path
from nemoforge.artifacts.store import ArtifactStore
from nemoforge.artifacts.uris import join_uri
from nemoforge.config import CorpusTrainConfig, Recipe
from nemoforge.data.corpus import CorpusSplits, load_corpus
from nemoforge.data.packing import token_digest
from nemoforge.runtime import compute_device, recipe_dtype, seed_for
from nemoforge.stages.result import DatasetRef, StageResult
from nemoforge.stats import paired_mean_difference
from nemoforge.training.checkpoint import TrainState, is_complete_checkpoint
from nemoforge.training.evaluate import heldout_means, heldout_row_scores
from nemoforge.training.flops import training_flops_per_token
from nemoforge.training.loop import LogFn, LossFn, epoch_batches, train
from nemoforge.training.perf import mask_packed_documents

_STEP_URI = re.compile(r"/step-(\d+)/")


def round_to_dtype(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Round every parameter in place to the nearest ``dtype`` value, keeping its own dtype.

    After it, casting the model to ``dtype`` (the export) loses nothing, so what is measured on the model is
    what is exported. It matters where updates are smaller than ``dtype``'s resolution: an AdamW step of lr
    1e-5 on a weight of 0.05 is a twentieth of a bfloat16 ulp there (2^-8 relative), so float32 weights after
    GRPO can behave unlike their bfloat16 export.
    """
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(param.to(dtype))


def load_teacher(model_dir: Path, *, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    """A frozen model in eval mode (no grads) on ``device``: the parent in distillation."""
    from nemoforge.models.convert import load_causal_lm

    return load_causal_lm(model_dir, dtype=dtype).to(device).eval().requires_grad_(False)


def fetch_latest_checkpoint(store: ArtifactStore, checkpoints_uri: str, local_dir: Path) -> int:
    """Copy the newest complete ``step-N`` checkpoint under ``checkpoints_uri`` into ``local_dir``.

    Incomplete uploads (a ``step-N`` missing files, or with sizes that differ from its ``meta.json``)
    are skipped in favour of an older complete one.

    Returns:
        N of the copied checkpoint, 0 when there is none.
    """
    for step in reversed(stored_steps(store, checkpoints_uri)):
        source = store.fetch(join_uri(checkpoints_uri, f"step-{step}"))
        if is_complete_checkpoint(source):
            local_dir.mkdir(parents=True, exist_ok=True)
            shutil.copytree(source, local_dir / f"step-{step}", dirs_exist_ok=True)
            return step
    return 0


def stored_steps(store: ArtifactStore, checkpoints_uri: str) -> list[int]:
    """The N of every ``step-N/`` under ``checkpoints_uri`` in the store (complete or not), ascending."""
    if not store.exists(checkpoints_uri):
        return []
    prefix = checkpoints_uri.rstrip("/")
    return sorted({int(m.group(1)) for uri in store.list(prefix) if (m := _STEP_URI.match(uri[len(prefix) :]))})


def checkpoint_uploader(store: ArtifactStore, checkpoints_uri: str, keep: int) -> Callable[[Path], None]:
    """An ``on_checkpoint`` for :func:`~nemoforge.training.loop.train` that bounds the store's disk use.

    It uploads each new ``step-N/`` to ``checkpoints_uri/step-N`` and, once that upload is verified, deletes
    every older ``step-M/`` there but the newest ``keep`` (``TrainConfig.keep_checkpoints``), so the store
    holds at most ``keep`` checkpoints of a stage (each about 12 bytes per parameter: weights and two AdamW
    moments in float32) besides its exported model. Pruning follows a verified upload, so the newest
    complete checkpoint, the one a resumed run fetches, is never the one deleted.

    Raises:
        StorageError: (when called) the upload or a delete fails.
    """

    def upload(path: Path) -> None:
        store.put(path, join_uri(checkpoints_uri, path.name))
        newest = int(path.name.removeprefix("step-"))
        # a higher step-M/ is a half-uploaded leftover of an earlier attempt: never counted, later overwritten
        for step in [s for s in stored_steps(store, checkpoints_uri) if s <= newest][:-keep]:
            store.delete(join_uri(checkpoints_uri, f"step-{step}"))

    return upload


def plot_history(history: dict[str, list[tuple[int, float]]], path: Path, title: str) -> Path:
    """Save a PNG of the training loss and its logged parts (``loss_*``) against the step."""
    fig = Figure(figsize=(7, 4), dpi=100)
    ax = fig.add_subplot()
    for name in sorted(n for n in history if n == "loss" or n.startswith("loss_")):
        steps, values = zip(*history[name], strict=True)
        ax.plot(steps, values, label=name, linewidth=2 if name == "loss" else 1)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    return path


def heldout_drops(before: dict[str, list[float]], after: dict[str, list[float]]) -> dict[str, float]:
    """Before minus after of each per-row held-out score, paired over the same rows, with its 95% interval.

    Args:
        before: :func:`~nemoforge.training.evaluate.heldout_row_scores` before training (``[N]`` per score,
            nats/token).
        after: the same scores of the same rows after training.

    Returns:
        ``<name>_drop`` (``<name>_before - <name>_after``, nats/token; > 0: training lowered it),
        ``<name>_drop_ci_low``, ``<name>_drop_ci_high`` for each score (``loss_heldout``, ``kl_div_heldout``):
        :func:`~nemoforge.stats.paired_mean_difference` with each row its own cluster (the tokens of a row
        are not independent, rows are).
    """
    metrics = {}
    for name, before_N in before.items():
        drop = paired_mean_difference(after[name], before_N)  # second minus first: before - after
        metrics |= {
            f"{name}_drop": drop.point, f"{name}_drop_ci_low": drop.low, f"{name}_drop_ci_high": drop.high
        }
    return metrics


def run_training_stage(
    stage: str,
    cfg: CorpusTrainConfig,
    recipe: Recipe,
    *,
    model_uri: str,
    corpus_uri: str,
    output_uri: str,
    store: ArtifactStore,
    loss_fn: LossFn,
    teacher: torch.nn.Module | None = None,
    on_log: LogFn | None = None,
) -> StageResult:
    """Train the model at ``model_uri`` on the corpus with ``loss_fn``; export, upload, report.

    The student is trained in float32 (bf16 autocast on CUDA) and exported in ``recipe.dtype``. It is
    scored on the held-out rows before and after (:func:`~nemoforge.training.evaluate.heldout_row_scores`;
    with ``teacher``, also its KL to the teacher), and the drop from before to after is paired over the rows
    (:func:`heldout_drops`). A re-run resumes from the newest complete checkpoint
    under ``output_uri/checkpoints`` (a finished run only re-scores and re-exports). With
    ``cfg.document_masking``, the student and the teacher attend within each packed document only, in
    training and in both held-out scorings (:func:`~nemoforge.training.perf.mask_packed_documents`, EOS of the
    tokenizer). The logged MFU counts the student's model FLOPs (the teacher's forward is not counted).

    Args:
        stage: the stage's name (progress label, plot title, temp-dir prefix).
        cfg: the stage's recipe section.
        recipe: the whole recipe (``dtype``).
        model_uri: the model to train (a Llama or nemotron-nas checkpoint).
        corpus_uri: the corpus written by the corpus step.
        output_uri: where everything is written.
        store: the artifact store.
        loss_fn: ``loss_fn(model, input_ids_BT) -> (loss, parts)``.
        teacher: the frozen parent, on the training device, for ``kl_div_heldout``.
        on_log: called as ``on_log(step, metrics)`` while training, every ``cfg.log_every_steps`` updates
            (the runner logs them to the stage's MLflow run); None: only the returned history.

    Returns:
        metrics ``<name>_before``/``<name>_after`` for ``loss_heldout``, ``perplexity_heldout`` (and
        ``kl_div_heldout``), ``<name>_drop``/``_drop_ci_low``/``_drop_ci_high`` for ``loss_heldout`` (and
        ``kl_div_heldout``), ``loss_final``, ``train_steps``, ``train_tokens``, ``tokens_per_s``, ``params``;
        the per-step history; outputs ``model`` and ``checkpoints``; the model's digest; the loss-curve plot;
        the corpus splits as datasets; tags ``device``, ``params``, ``block_configs``, ``resumed_from_step``.

        On a torchrun rank other than 0 (:mod:`~nemoforge.training.distributed`), only the history and the
        ``device`` tag: that rank trains its share of each batch and returns; rank 0 does the rest.

    Raises:
        InputNotFoundError: the model or corpus URI does not exist.
        NemoforgeError: training diverged.
    """
    device = compute_device()
    student = load_student(cfg, model_uri=model_uri, corpus_uri=corpus_uri, store=store, device=device)
    model, heldout_NT = student.model, student.heldout_NT
    masks = []
    if cfg.document_masking:
        eos_id = student.tokenizer.eos_token_id
        masks = [mask_packed_documents(m, eos_id) for m in (model, teacher) if m is not None]
    before = heldout_row_scores(model, heldout_NT, batch_size=cfg.batch_size, teacher=teacher)

    checkpoints_uri = join_uri(output_uri, "checkpoints")
    with tempfile.TemporaryDirectory(prefix=f"nemoforge-{stage}-") as tmp:
        work = Path(tmp)
        fetch_latest_checkpoint(store, checkpoints_uri, work / "checkpoints")
        train_ids_NT = student.corpus.train_ids_NT
        state: TrainState = train(
            model,
            loss_fn,
            epoch_batches(train_ids_NT, cfg.batch_size, seed=seed_for(recipe, f"{stage}.batches")),
            cfg,
            seed=seed_for(recipe, f"{stage}.train"),
            checkpoint_dir=work / "checkpoints",
            desc=stage,
            on_log=on_log,
            on_checkpoint=checkpoint_uploader(store, checkpoints_uri, cfg.keep_checkpoints),
            flops_per_token=training_flops_per_token(model.config, train_ids_NT.shape[1]),
            peak_flops_per_s=cfg.peak_flops_per_s,
        )
        from nemoforge.training.distributed import is_main_process

        if not is_main_process():  # under torchrun, rank 0 scores, exports and uploads; the others only train
            return StageResult(history=state.history, tags={"device": str(device)})
        after = heldout_row_scores(model, heldout_NT, batch_size=cfg.batch_size, teacher=teacher)
        for handle in masks:
            handle.remove()

        exported = export_model(model, student.tokenizer, recipe, output_uri=output_uri, store=store, work=work)
        plot_uri = join_uri(output_uri, "plots", "loss_curve.png")
        store.put(plot_history(state.history, work / "loss_curve.png", f"{stage}: training loss"), plot_uri)

    return training_report(
        cfg, student, state, before, after, exported, checkpoints_uri=checkpoints_uri, plot_uri=plot_uri, device=device
    )


@dataclass(frozen=True)
class Student:
    """What a corpus training stage starts from: the model to train, its tokenizer, the corpus, the held-out rows.

    Attributes:
        model: the model at ``model_uri`` in float32 on the training device.
        tokenizer: its tokenizer.
        corpus: the corpus step's splits.
        heldout_NT: the first ``cfg.heldout_sequences`` held-out rows, scored before and after training.
    """

    model: torch.nn.Module
    tokenizer: Any
    corpus: CorpusSplits
    heldout_NT: torch.Tensor


def load_student(
    cfg: CorpusTrainConfig, *, model_uri: str, corpus_uri: str, store: ArtifactStore, device: torch.device
) -> Student:
    """Fetch the corpus and the model to train; load the model in float32 on ``device`` with its tokenizer.

    Raises:
        InputNotFoundError: the model or corpus URI does not exist.
    """
    from transformers import AutoTokenizer

    from nemoforge.models.convert import load_causal_lm

    corpus = load_corpus(store.fetch(corpus_uri))
    model_dir = store.fetch(model_uri)
    model = load_causal_lm(model_dir, dtype=torch.float32).to(device)
    # config given: AutoTokenizer would otherwise read a nemotron-nas export's auto_map and ask [y/N] on stdin
    tokenizer = AutoTokenizer.from_pretrained(model_dir, config=model.config)
    return Student(model, tokenizer, corpus, corpus.heldout_ids_NT[: cfg.heldout_sequences])


@dataclass(frozen=True)
class ExportedModel:
    """A stage's exported model in the store: ``uri`` (``<output_uri>/model``) and the ``digest`` of its files."""

    uri: str
    digest: str


def export_model(
    model: torch.nn.Module, tokenizer: Any, recipe: Recipe, *, output_uri: str, store: ArtifactStore, work: Path
) -> ExportedModel:
    """Export ``model`` in ``recipe.dtype`` (cast in place) as a nemotron-nas checkpoint to ``<output_uri>/model``.

    Args:
        model: the trained model (cast to ``recipe.dtype`` in place: train and score before this).
        tokenizer: saved beside the weights.
        recipe: the resolved recipe (``dtype``).
        output_uri: the stage's output prefix.
        store: the artifact store.
        work: a local scratch directory (the export is written to ``work/model`` first).

    Raises:
        StorageError: the upload fails or does not verify.
    """
    from nemoforge.models.export import export_checkpoint

    export_dir = export_checkpoint(model.to(recipe_dtype(recipe)), tokenizer, work / "model")
    exported = ExportedModel(join_uri(output_uri, "model"), digest_path(export_dir))
    store.put(export_dir, exported.uri)
    return exported


def training_report(
    cfg: CorpusTrainConfig,
    student: Student,
    state: TrainState,
    before: dict[str, list[float]],
    after: dict[str, list[float]],
    exported: ExportedModel,
    *,
    checkpoints_uri: str,
    plot_uri: str,
    device: torch.device,
) -> StageResult:
    """The :class:`StageResult` of a corpus training stage (see :func:`run_training_stage`'s Returns).

    Args:
        cfg: the stage's recipe section.
        student: what the stage trained.
        state: the training run's final state (step, history).
        before: :func:`~nemoforge.training.evaluate.heldout_row_scores` of ``student.heldout_NT`` before training.
        after: the same after training.
        exported: the exported model.
        checkpoints_uri: where the checkpoints are.
        plot_uri: the loss-curve plot.
        device: the training device.
    """
    from nemoforge.models.block_configs import summarize

    model, corpus, heldout_NT = student.model, student.corpus, student.heldout_NT
    num_params = sum(p.numel() for p in model.parameters())
    throughput = [v for _, v in state.history.get("tokens_per_s", [])[1:]] or [0.0]  # step 1 includes warm-up
    metrics = {f"{k}_before": v for k, v in heldout_means(before).items()}
    metrics |= {f"{k}_after": v for k, v in heldout_means(after).items()}
    metrics |= heldout_drops(before, after)
    metrics |= {
        "loss_final": state.history["loss"][-1][1],
        "train_steps": float(state.step),
        "train_tokens": float(state.step * cfg.batch_size * corpus.train_ids_NT.shape[1]),
        "tokens_per_s": sum(throughput) / len(throughput),
        "params": float(num_params),
    }
    return StageResult(
        metrics=metrics,
        history=state.history,
        outputs={"model": exported.uri, "checkpoints": checkpoints_uri},
        digests={"model": exported.digest},
        plots={"loss_curve": plot_uri},
        datasets=[
            DatasetRef(
                "corpus-train",
                corpus.source_uri,
                token_digest(corpus.train_ids_NT),
                corpus.train_ids_NT.shape[0],
                "training",
            ),
            DatasetRef(
                "corpus-heldout",
                corpus.source_uri,
                token_digest(heldout_NT),
                heldout_NT.shape[0],
                "validation",
            ),
        ],
        tags={
            "device": str(device),
            "params": str(num_params),
            "block_configs": summarize(model.config.block_configs, model.config.hidden_size),
            "resumed_from_step": str(state.resumed_from_step),
        },
    )
