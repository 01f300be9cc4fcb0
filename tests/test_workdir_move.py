"""A workdir can be moved or copied (issue 15 §6): the registry, the step index and status point into the copy.

The workdir is made by the real runner (:func:`nemoforge.runner.execute.run_step`: step index, MLflow stage run,
registration of the champion) around a stand-in for the eval stage's ``run()`` that evaluates nothing, so it takes
seconds; the model is the tiny Llama of ``conftest.py``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from nemoforge.artifacts import store_for
from nemoforge.artifacts.store import ArtifactStore
from nemoforge.artifacts.uris import join_uri
from nemoforge.config import Recipe
from nemoforge.preflight import resolve_recipe
from nemoforge.runner.stage_table import StageEntry
from nemoforge.stages.result import DatasetRef, StageResult

NAME = "move-test-child"


def _workdir_recipe(workdir: Path) -> Recipe:
    return resolve_recipe(Recipe(name="move-test", model={"name": NAME}), workdir)


class _Eval:
    """Stands in for ``nemoforge.stages.eval.run``: the outputs and tags eval returns, a passed gate, no evaluation."""

    def __init__(self) -> None:
        self.num_calls = 0

    def __call__(
        self,
        recipe: Recipe,
        *,
        model_uri: str,
        parent_uri: str,
        output_uri: str,
        store: ArtifactStore,
        champion: dict[str, Any] | None,
    ) -> StageResult:
        self.num_calls += 1
        outputs = {"model": model_uri, "report": store.write_json(join_uri(output_uri, "report.json"), {"ok": 1}),
                   "registration": join_uri(output_uri, "registration.json")}  # fmt: skip
        return StageResult(
            metrics={"math_pass1_on": 0.5},
            outputs=outputs,
            digests={"model": store.digest(model_uri)},
            datasets=[
                DatasetRef("eval-heldout-text", store.join("corpus", "c0ffee"), "cd" * 32, 4, "validation")
            ],
            tags={"gate": "passed", "gate_checks": "ok: no champion yet", "eval_settings": "settings"},
        )


@pytest.fixture
def fake_eval(monkeypatch: pytest.MonkeyPatch) -> _Eval:
    fake = _Eval()
    monkeypatch.setattr(StageEntry, "run_fn", lambda self: fake)
    return fake


def test_a_copied_workdir_serves_and_reuses_its_own_files_once_the_original_is_gone(
    tiny_llama_dir: Path, tmp_path: Path, fake_eval: _Eval, capsys: pytest.CaptureFixture[str]
) -> None:
    from transformers import AutoModelForCausalLM

    from nemoforge import lineage
    from nemoforge.runner.execute import run_step
    from nemoforge.runner.register import champion_record
    from nemoforge_cli.main import main

    original, copy = tmp_path / "work", tmp_path / "moved" / "work-copy"
    recipe = _workdir_recipe(original)
    store = store_for(recipe)
    rl_uri = store.put(tiny_llama_dir, store.join("run-1", "rl", "model"))
    parent_uri = store.put(tiny_llama_dir, store.join("models", "parent-0123"))
    inputs = {"model": {"uri": rl_uri, "digest": store.digest(rl_uri)},
              "parent": {"uri": parent_uri, "digest": store.digest(parent_uri)}}  # fmt: skip
    registered = run_step("eval", recipe, "run-1", inputs)["model"]
    assert registered["version"] == 1 and registered["aliases"] == ["challenger", "champion"]
    assert fake_eval.num_calls == 1
    # what outlives the run names the model relative to the artifact root
    version = lineage.Registry(recipe.tracking.mlflow_uri).client.get_model_version_by_alias(NAME, "champion")
    assert version.source == "run-1/rl/model" and version.tags["nemoforge.model_uri"] == "run-1/rl/model"
    assert version.run_id is not None and "nemoforge.model_id" in version.tags  # linked to eval's LoggedModel
    (index_file,) = (original / "artifacts" / "index" / "eval").glob("*.json")
    assert json.loads(index_file.read_text())["output_uri"] == "run-1/eval"

    assert lineage.Lineage.for_recipe(recipe).moved_artifact_location() is None
    shutil.copytree(original, copy)
    shutil.rmtree(original)

    moved = _workdir_recipe(copy)
    model_dir = copy / "artifacts" / "run-1" / "rl" / "model"
    # serving models:/NAME@champion: the registry's source resolves into the copy, and the model there loads
    registry = lineage.Registry(moved.tracking.mlflow_uri, moved.storage.artifact_root)
    source = registry.registered_model_source(f"models:/{NAME}@champion")
    assert source == str(model_dir) and Path(source).is_dir()
    model = AutoModelForCausalLM.from_pretrained(store_for(moved).fetch(source))
    assert model.config.hidden_size == 64
    # `nemoforge serve` resolves it the same way (--emit then refuses the local path for a cluster, naming it)
    capsys.readouterr()
    assert main(["serve", f"models:/{NAME}@champion", "--workdir", str(copy), "--emit", "kserve"]) == 2
    assert f"but {model_dir} is not an s3:// URI" in capsys.readouterr().err

    # the champion the next eval's gate compares with
    assert champion_record(moved)["model_uri"] == str(model_dir)

    # a re-run in the copy reuses eval by its step index, with the copy's URIs, and registers nothing new
    # (MLflow's own run artifacts, recipe.json, still go where the experiment was created: `run` warns of it)
    assert lineage.Lineage.for_recipe(moved).moved_artifact_location() == str(original.resolve() / "mlruns")
    moved_inputs = {
        k: {**ref, "uri": ref["uri"].replace(str(original), str(copy))} for k, ref in inputs.items()
    }
    again = run_step("eval", moved, "run-2", moved_inputs)["model"]
    assert fake_eval.num_calls == 1 and again["version"] == 1
    assert again["uri"] == str(model_dir)

    # `nemoforge status` shows the copy's files
    capsys.readouterr()  # the re-run's console line ("eval (reused): ...") is not status's output
    assert main(["status", "--workdir", str(copy), "--run", "run-1", "--json"]) == 0
    (evaluated,) = [row for row in json.loads(capsys.readouterr().out)["stages"] if row["stage"] == "eval"]
    assert evaluated["outputs"]["model"] == str(model_dir)
    assert evaluated["outputs"]["report"] == str(copy / "artifacts" / "run-1" / "eval" / "report.json")
    assert all(Path(uri).exists() for name, uri in evaluated["outputs"].items() if name != "registration")


def test_records_that_hold_absolute_paths_read_as_before(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """A workdir written before URIs were stored relative (absolute paths) still serves and reuses."""
    from nemoforge import lineage
    from nemoforge.runner.index import StepIndex

    recipe = _workdir_recipe(tmp_path / "work")
    store = store_for(recipe)
    model_uri = store.put(tiny_llama_dir, store.join("run-1", "rl", "model"))
    # written as before: no artifact root, so the registry and the index hold absolute paths
    lineage.Registry(recipe.tracking.mlflow_uri).register_model(NAME, model_uri, aliases=["champion"])
    old = {
        "state": "done",
        "output_uri": store.join("run-1", "eval"),
        "result": {"outputs": {"model": model_uri}},
    }
    store.write_json(store.join("index", "eval", "k.json"), old)

    registry = lineage.Registry.for_recipe(recipe)
    assert registry.client.get_model_version_by_alias(NAME, "champion").source == model_uri  # absolute
    assert registry.registered_model_source(f"models:/{NAME}@champion") == model_uri
    assert StepIndex(store, "eval", "k").read() == old
