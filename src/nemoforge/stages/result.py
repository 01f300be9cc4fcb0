"""What a stage returns: small, typed, and free of mlflow/kfp (the component adapter logs it)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class DatasetRef:
    """A dataset a stage read: logged with ``mlflow.log_input`` by the lineage layer.

    Attributes:
        name: short name, e.g. ``"corpus-train"``.
        source_uri: where it came from (file path, ``s3://`` URI, ``hf://`` name or ``teacher://``).
        digest: sha256 hex of its content (the tokenized sequences for corpora).
        num_rows: rows / sequences.
        context: ``"training"``, ``"validation"`` or ``"calibration"``.
    """

    name: str
    source_uri: str
    digest: str
    num_rows: int
    context: str = "training"


@dataclass
class StageResult:
    """A stage's outcome.

    Attributes:
        metrics: final scalar metrics (``kl_div_heldout``, ``params``, ``latency_ms``, ...).
        history: per-step metrics, ``{name: [(step, value), ...]}`` (loss curves).
        outputs: output URIs by name; ``"model"`` is the checkpoint handed to the next stage.
        digests: sha256 of each output by the same name.
        plots: PNG URIs by name (loss curve, Pareto front).
        reports: URIs of small JSON outputs by name (the nas stage's ``ffn_fusion.json``), copied into the run.
        datasets: inputs read, with digests.
        tags: small string facts (``block_configs`` summary, device).
    """

    metrics: dict[str, float] = field(default_factory=dict)
    history: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)
    digests: dict[str, str] = field(default_factory=dict)
    plots: dict[str, str] = field(default_factory=dict)
    reports: dict[str, str] = field(default_factory=dict)
    datasets: list[DatasetRef] = field(default_factory=list)
    tags: dict[str, str] = field(default_factory=dict)
