"""Execute one pipeline step: reuse it when its key matches, otherwise run it under lineage.

This is the library half of every KFP component (the component only turns its artifacts into references and
back), so the same code runs under ``kfp.local``, on a cluster, and in plain pytest. Keys and the step index:
:mod:`nemoforge.runner.index`; which stage runs how: :mod:`nemoforge.runner.stage_table`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from nemoforge.artifacts import store_for
from nemoforge.artifacts.cache import cache_root
from nemoforge.artifacts.digests import digest_path
from nemoforge.artifacts.uris import relative_uri
from nemoforge.config import Recipe
from nemoforge.errors import NemoforgeError
from nemoforge.runner.index import (
    Ref,
    StepIndex,
    model_ref,
    result_from_json,
    result_to_json,
    step_key,
    stored_uris,
)
from nemoforge.runner.stage_table import stage_entry, stage_key
from nemoforge.stages.result import StageResult, format_metrics, key_metrics


# ------------------------------------------------------------------------------------ preparation
def _preparation_step(
    recipe: Recipe,
    run_name: str,
    step: str,
    key: str,
    inputs: dict[str, Ref],
    prepare: Callable[[], tuple[Ref, dict[str, float]]],
) -> Ref:
    """A preparation step in its own MLflow run under the pipeline run: reuse its reference by key, else prepare it.

    The run (named ``step``, as a stage's is) records the output's URI and digest (tags ``nemoforge.output.<step>``,
    ``nemoforge.digest.<step>``), the step's metrics, its wall time and, when the step index already held the
    result, ``nemoforge.reused``: ``nemoforge status`` lists it beside the stages.

    Args:
        recipe: the resolved recipe.
        run_name: the pipeline run (the MLflow parent run's name).
        step: ``parent`` or ``corpus``.
        key: the step's key in the step index.
        inputs: upstream references by name, recorded as the run's input URIs.
        prepare: does the work; returns the reference and the metrics to record (also on later reuse).
    """
    from nemoforge.lineage import Lineage

    store = store_for(recipe)
    index = StepIndex(store, step, key)
    input_uris = {f"{name}_uri": ref["uri"] for name, ref in inputs.items()}
    with Lineage.for_recipe(recipe).stage_run(run_name, step, recipe, input_uris=input_uris) as tracker:
        entry = index.read()
        reused = bool(entry and entry.get("state") == "done" and store.exists(entry["ref"]["uri"]))
        if reused:
            ref, metrics = entry["ref"], entry.get("metrics", {})
        else:
            ref, metrics = prepare()
            index.write(state="done", ref=ref, metrics=metrics)
        tracker.log_result(
            StageResult(
                metrics=metrics,
                outputs={step: ref["uri"]},
                digests={step: ref["digest"]},
                tags={"nemoforge.reused": "true"} if reused else {},
            )
        )
    print_key_metrics(step, metrics, reused)
    return ref


NUM_ENDING_METRICS = 4
"""How many key metrics the line a step prints as it ends holds."""


def print_key_metrics(step: str, metrics: dict[str, float], reused: bool) -> None:
    """The line a step prints as it ends: its key metrics (:data:`nemoforge.stages.result.KEY_METRICS`), and
    whether an earlier run's result was reused; nothing for a step without key metrics (the parent)."""
    shown = key_metrics(step, metrics, NUM_ENDING_METRICS, key_only=True)
    if shown:
        print(f"nemoforge: {step}{' (reused)' if reused else ''}: {format_metrics(shown)}", flush=True)


def prepare_parent_step(recipe: Recipe, run_name: str) -> Ref:
    """Convert the parent once and place it in the store (reused by key on later runs), in MLflow run ``parent``."""
    from nemoforge.models.parent import prepare_parent

    key = step_key("parent", recipe.model.parent, {})

    def prepare() -> tuple[Ref, dict[str, float]]:
        store = store_for(recipe)
        local_dir = prepare_parent(recipe.model.parent, cache_root() / "parent")
        uri = store.put(local_dir, store.join("models", f"parent-{key[:12]}"))
        return {"uri": uri, "digest": digest_path(local_dir), "source": recipe.model.parent.source}, {}

    return _preparation_step(recipe, run_name, "parent", key, {}, prepare)


CORPUS_FIELDS = frozenset(
    {"corpus_uri", "text_field", "seq_len_tokens", "heldout_fraction", "max_sequences", "teacher_corpus"}
)
"""The ``data`` fields that shape the corpus (the reasoning data, e.g. ``data.arithmetic``, does not)."""


def corpus_key(recipe: Recipe, inputs: dict[str, Ref]) -> str:
    """The corpus step's key: :data:`CORPUS_FIELDS`, the seed and the parent (when the corpus is sampled)."""
    section = {"data": recipe.data.model_dump(mode="json", include=set(CORPUS_FIELDS)), "seed": recipe.seed}
    return step_key("corpus", section, inputs)


def prepare_corpus_step(recipe: Recipe, run_name: str, parent: Ref) -> Ref:
    """Read (or sample from the parent), tokenize, pack and split the corpus (reused by key), in MLflow run ``corpus``.

    The run's metrics: ``num_train_sequences`` and ``num_heldout_sequences`` (packed rows of
    ``data.seq_len_tokens`` tokens).
    """
    from transformers import AutoTokenizer

    from nemoforge.data.corpus import prepare_corpus
    from nemoforge.runtime import seed_for

    key = corpus_key(recipe, {"parent": parent} if recipe.data.corpus_uri is None else {})

    def prepare() -> tuple[Ref, dict[str, float]]:
        store = store_for(recipe)
        parent_dir = store.fetch(parent["uri"])
        out_dir = cache_root() / "corpus" / key[:16]
        splits = prepare_corpus(
            recipe.data,
            tokenizer=AutoTokenizer.from_pretrained(parent_dir),
            parent_dir=parent_dir,
            out_dir=out_dir,
            seed=seed_for(recipe, "corpus"),
            store=store,
        )
        uri = store.put(out_dir, store.join("corpus", key[:16]))
        metrics = {
            "num_train_sequences": float(splits.train_ids_NT.shape[0]),
            "num_heldout_sequences": float(splits.heldout_ids_NT.shape[0]),
        }
        return {"uri": uri, "digest": splits.digest, "source_uri": splits.source_uri}, metrics

    return _preparation_step(recipe, run_name, "corpus", key, {"parent": parent}, prepare)


def execute_stage(
    stage: str,
    recipe: Recipe,
    run_name: str,
    inputs: dict[str, Ref],
    *,
    on_output: Callable[[str | None], None] | None = None,
) -> tuple[StageResult, Ref]:
    """Run (or reuse) one stage inside its MLflow run; return its result and its model reference.

    A training stage (its table entry's ``trains``) logs its metrics to that run every ``log_every_steps``
    updates, with the step and the wall-clock time, as it trains; the rest of its result at the end.

    Args:
        stage: ``nas``, ``distill``, ``cpt``, ``sft``, ``rl``, ``eval`` (or ``serve``).
        recipe: the resolved recipe (tracking URI and artifact root set).
        run_name: the pipeline run this execution belongs to (the MLflow parent run's name).
        inputs: upstream references by the stage's argument name without ``_uri``
            (``parent``, ``model``, ``corpus``, ``data``): sft takes ``model``; rl ``model`` and ``data`` (sft's
            split); eval ``model``, ``parent``, ``corpus`` and (with sft in the pipeline) ``data``.
        on_output: called with the output URI right before the stage runs, or with None when its result is
            reused (rank 0 of a TrainJob tells the other ranks, which then :func:`join_stage` or stop).

    Raises:
        NemoforgeError: a user-fixable problem (bad input URI, store refuses); the stage run ends FAILED.
    """
    from nemoforge.lineage import Lineage

    spec = stage_entry(stage)
    store = store_for(recipe)
    key = stage_key(recipe, stage, inputs)
    index = StepIndex(store, stage, key)
    entry = index.read()
    input_uris = {f"{name}_uri": ref["uri"] for name, ref in inputs.items()}
    reused = bool(entry and entry.get("state") == "done")
    with Lineage.for_recipe(recipe).stage_run(run_name, stage, recipe, input_uris=input_uris) as tracker:
        if reused:
            result = result_from_json(entry["result"])
            reused_from = relative_uri(entry["output_uri"], store.root_uri)
            tracker.set_tags({"nemoforge.reused": "true", "nemoforge.reused_from": reused_from})
            if on_output is not None:
                on_output(None)
        else:
            output_uri = entry["output_uri"] if entry else store.join(run_name, stage)
            index.write(state="running", output_uri=output_uri)
            stored_output = relative_uri(output_uri, store.root_uri)
            tracker.set_tags({"nemoforge.output_uri": stored_output, "nemoforge.step_key": key})
            if on_output is not None:
                on_output(output_uri)
            live = {"on_log": tracker.log_metrics} if spec.trains else {}
            context = spec.context(recipe) if spec.context else {}
            result = spec.run_fn()(recipe, **input_uris, output_uri=output_uri, store=store, **live, **context)
            stored = stored_uris(result_to_json(result), lambda uri: relative_uri(uri, store.root_uri))
            store.write_json(f"{output_uri.rstrip('/')}/result.json", stored)
            index.write(state="done", output_uri=output_uri, result=result_to_json(result))
        tracker.log_result(result)
    print_key_metrics(stage, result.metrics, reused)
    return result, model_ref(result)


def join_stage(stage: str, recipe: Recipe, inputs: dict[str, Ref], output_uri: str) -> StageResult:
    """Only the stage's ``run()`` under ``output_uri``: no key, index or lineage.

    What a torchrun rank other than 0 of a TrainJob does: rank 0 keeps the books in :func:`execute_stage`
    and hands over its ``output_uri``; this rank trains its share and returns (see
    :mod:`nemoforge.training.distributed`).
    """
    input_uris = {f"{name}_uri": ref["uri"] for name, ref in inputs.items()}
    spec = stage_entry(stage)
    context = spec.context(recipe) if spec.context else {}
    return spec.run_fn()(recipe, **input_uris, output_uri=output_uri, store=store_for(recipe), **context)


def run_step(step: str, recipe: Recipe, run_name: str, inputs: dict[str, Ref]) -> dict[str, Ref]:
    """Run one pipeline step and return the references its task outputs.

    Args:
        step: ``parent``, ``corpus``, or a stage of :data:`~nemoforge.runner.stage_table.STAGE_TABLE`.
        recipe: the resolved recipe (the pipeline's ``recipe_json``).
        run_name: the pipeline run's name (its MLflow parent run, under which the step's run goes).
        inputs: the upstream references by name (``parent``, ``model``, ``corpus``, ``data``).

    Returns:
        The step's output references by name: ``parent``, ``corpus``, or a stage's
        :meth:`~nemoforge.runner.stage_table.StageEntry.output_refs` (``model``, and sft's ``data``; serve's
        ``responses``). A stage that runs as a Kubeflow Trainer TrainJob goes through
        :func:`nemoforge.cluster.launcher.launch_stage` instead.
    """
    if step == "parent":
        return {"parent": prepare_parent_step(recipe, run_name)}
    if step == "corpus":
        return {"corpus": prepare_corpus_step(recipe, run_name, inputs["parent"])}
    result, _ = execute_stage(step, recipe, run_name, inputs)
    return stage_entry(step).output_refs(recipe, run_name, result, inputs)


def finalize_run(recipe: Recipe, run_name: str, succeeded: bool) -> None:
    """Close the MLflow parent run of ``run_name`` as FINISHED or FAILED."""
    from nemoforge.lineage import Lineage

    Lineage.for_recipe(recipe).finish_pipeline_run(run_name, "FINISHED" if succeeded else "FAILED")


@contextmanager
def user_errors() -> Iterator[None]:
    """In a component: print a NemoforgeError as one line and exit 1 (traceback only with NEMOFORGE_DEBUG=1).

    Under ``nemoforge run`` the failing step's message (for any other exception: its type and message,
    the traceback staying in the task log) is also written to ``$NEMOFORGE_ERROR_FILE``, so the CLI can
    repeat it after kfp.local's summary. SIGTERM and SIGINT stop the step as Ctrl-C does
    (:func:`nemoforge.signals.interrupt_on_signals`: its MLflow run ends KILLED); it then exits with the shell's
    code for the signal (143, 130) after one line.
    """
    from nemoforge.signals import exit_code, interrupt_on_signals

    error_file = os.environ.get("NEMOFORGE_ERROR_FILE")
    try:
        with interrupt_on_signals():
            yield
    except KeyboardInterrupt as stop:
        signal_name = str(stop) or "SIGINT"
        sys.stderr.write(f"nemoforge: stopped by {signal_name}\n")
        raise SystemExit(exit_code(signal_name)) from None
    except NemoforgeError as err:
        if error_file:
            Path(error_file).write_text(f"{err}\n")
        if os.environ.get("NEMOFORGE_DEBUG") == "1":
            raise
        sys.stderr.write(f"nemoforge: error: {err}\n")
        raise SystemExit(1) from None
    except Exception as err:
        if error_file:
            first_line = (str(err).splitlines() or [""])[0]
            Path(error_file).write_text(
                f"{type(err).__name__}: {first_line} (traceback in the task log above)\n"
            )
        raise
