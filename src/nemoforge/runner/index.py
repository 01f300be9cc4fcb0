"""A step's key and the store's step index: what lets a re-run reuse or resume a step.

A step's **key** is the sha256 of its recipe section and its input digests. The store keeps an index
``<root>/index/<step>/<key>.json``: ``running`` with the output URI while the step works (a re-run
after a failure resumes in the same place, from the stage's checkpoints), ``done`` with the
:class:`~nemoforge.stages.result.StageResult` afterwards (a re-run reuses it instead of recomputing).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

from nemoforge.artifacts import ArtifactStore
from nemoforge.stages.result import DatasetRef, StageResult

Ref = dict[str, Any]
"""An artifact reference passed between steps (KFP artifact metadata): ``{"uri", "digest", ...}``."""


def step_key(step: str, section: Any, inputs: dict[str, Ref]) -> str:
    """sha256 of the step name, its resolved recipe section and its inputs' digests."""
    payload = {
        "step": step,
        "section": section.model_dump(mode="json") if hasattr(section, "model_dump") else section,
        "inputs": {name: ref["digest"] for name, ref in sorted(inputs.items())},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def result_to_json(result: StageResult) -> dict[str, Any]:
    return dataclasses.asdict(result)


def result_from_json(data: dict[str, Any]) -> StageResult:
    data = dict(data)
    data["datasets"] = [DatasetRef(**d) for d in data.get("datasets", [])]
    data["history"] = {k: [tuple(p) for p in v] for k, v in data.get("history", {}).items()}
    return StageResult(**data)


class StepIndex:
    """The ``index/<step>/<key>.json`` records of one store."""

    def __init__(self, store: ArtifactStore, step: str, key: str):
        self.store = store
        self.uri = store.join("index", step, f"{key}.json")

    def read(self) -> dict[str, Any] | None:
        return self.store.read_json(self.uri) if self.store.exists(self.uri) else None

    def write(self, **entry: Any) -> None:
        self.store.write_json(self.uri, entry)


def model_ref(result: StageResult, **extra: Any) -> Ref:
    """The reference a model-producing step hands downstream: its model's URI and digest, its ``block_configs``
    and ``params`` tags, and ``extra``."""
    ref = {"uri": result.outputs["model"], "digest": result.digests["model"]}
    ref.update({k: v for k, v in result.tags.items() if k in ("block_configs", "params")})
    ref.update(extra)
    return ref
