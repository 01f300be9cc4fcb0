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


KEY_METRICS = {
    "nas": ("speedup", "kl_div_heldout", "kl_div_predicted"),
    "distill": ("kl_div_heldout_drop", "kl_div_heldout_after", "loss_heldout_after"),
    "cpt": ("loss_heldout_drop", "loss_heldout_after"),
    "sft": ("toggle_on_after", "toggle_off_after", "loss_heldout_after"),
    "rl": ("accuracy_heldout_sampled_gain", "accuracy_heldout_gain", "reward_heldout_gain", "reward_heldout_after"),
    "eval": ("toggle_on", "toggle_off", "math_pass1_on", "math_pass1_off", "speedup"),
    "corpus": ("num_train_sequences", "num_heldout_sequences"),
}
"""Per step, its key metrics (what the step is for; eval: the promotion gate's): the line a stage prints when it
ends, and what a `nemoforge status` row lists first, before the rest in name order."""


def key_metrics(stage: str, metrics: dict[str, float], num: int, *, key_only: bool = False) -> list[tuple[str, float]]:
    """The first ``num`` of a step's metrics: :data:`KEY_METRICS` in their order, then (unless ``key_only``) the
    others by name; 95% interval bounds (``*_ci_low``/``*_ci_high``) left out."""
    shown = {k: v for k, v in metrics.items() if not k.endswith(("_ci_low", "_ci_high"))}
    first = [k for k in KEY_METRICS.get(stage, ()) if k in shown]
    rest = [] if key_only else sorted(k for k in shown if k not in first)
    return [(k, shown[k]) for k in first + rest][:num]


def format_metrics(metrics: list[tuple[str, float]]) -> str:
    """``name=value, ...`` with 4 significant digits."""
    return ", ".join(f"{k}={v:.4g}" for k, v in metrics)
