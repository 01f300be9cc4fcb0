"""A step's key and the store's step index: what lets a re-run reuse or resume a step.

A step's **key** is the sha256 of its recipe section and its input digests. The store keeps an index
``<root>/index/<step>/<key>.json``: ``running`` with the output URI while the step works (a re-run
after a failure resumes in the same place, from the stage's checkpoints), ``done`` with the
:class:`~nemoforge.stages.result.StageResult` afterwards (a re-run reuses it instead of recomputing). The URIs in a
record are stored relative to a local store root and resolved against the store in use when read
(:func:`stored_uris`), so a moved or copied workdir reuses its own outputs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from typing import Any

from nemoforge.artifacts.store import ArtifactStore
from nemoforge.artifacts.uris import relative_uri, resolve_uri
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


def stored_uris(record: dict[str, Any], convert: Callable[[str], str]) -> dict[str, Any]:
    """A copy of an index record (or of a result's JSON) with ``convert`` applied to each store URI it holds.

    Those are: a step reference's ``uri``, a stage's ``output_uri``, and its result's ``outputs``, ``plots``,
    ``reports`` and dataset ``source_uri`` (nothing else in a record is a URI: digests, metrics, tags).

    Args:
        record: an index record (``ref``, ``output_uri``, ``result``) or a result's JSON (:func:`result_to_json`).
        convert: :func:`~nemoforge.artifacts.uris.relative_uri` on the way in,
            :func:`~nemoforge.artifacts.uris.resolve_uri` on the way out, bound to the store's root.
    """
    record = dict(record)
    if "ref" in record:
        record["ref"] = {**record["ref"], "uri": convert(record["ref"]["uri"])}
    if "output_uri" in record:
        record["output_uri"] = convert(record["output_uri"])
    if "result" in record:
        record["result"] = stored_uris(record["result"], convert)
    for name in ("outputs", "plots", "reports"):
        if name in record:
            record[name] = {k: convert(v) for k, v in record[name].items()}
    if "datasets" in record:
        record["datasets"] = [{**d, "source_uri": convert(d["source_uri"])} for d in record["datasets"]]
    return record


class StepIndex:
    """The ``index/<step>/<key>.json`` records of one store, URIs relative to a local root (:func:`stored_uris`)."""

    def __init__(self, store: ArtifactStore, step: str, key: str):
        self.store = store
        self.uri = store.join("index", step, f"{key}.json")

    def read(self) -> dict[str, Any] | None:
        """The record, its URIs resolved against this store's root; None when there is none."""
        if not self.store.exists(self.uri):
            return None
        root = self.store.root_uri
        return stored_uris(self.store.read_json(self.uri), lambda uri: resolve_uri(uri, root))

    def write(self, **entry: Any) -> None:
        """Replace the record with ``entry`` (its URIs stored relative to a local root)."""
        root = self.store.root_uri
        self.store.write_json(self.uri, stored_uris(entry, lambda uri: relative_uri(uri, root)))


def model_ref(result: StageResult, **extra: Any) -> Ref:
    """The reference a model-producing step hands downstream: its model's URI and digest, its ``block_configs``
    and ``params`` tags, and ``extra``."""
    ref = {"uri": result.outputs["model"], "digest": result.digests["model"]}
    ref.update({k: v for k, v in result.tags.items() if k in ("block_configs", "params")})
    ref.update(extra)
    return ref
