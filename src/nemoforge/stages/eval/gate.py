"""The promotion gate: whether the evaluated child becomes ``champion`` in the model registry.

The child must meet every criterion of ``eval.gate``: a floor on ``gate.metric`` and on decode tokens/s,
the retention ``child / parent`` of each metric in ``gate.min_retention``, the decode speedup over the
parent, toggle compliance in each mode, and a value of ``gate.metric`` strictly above the champion's,
measured under the same eval settings. Each criterion gives one check line (``"ok: ..."`` / ``"fail: ..."``);
a failed gate is an outcome, never an exception.

The current champion's record (its version, model URI, metrics and the digest of the eval settings they were
measured under) comes from the MLflow registry, its one source of truth: the runner reads it and hands it to
the eval stage (:func:`nemoforge.runner.register.champion_record`), which decides without touching MLflow.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from nemoforge.artifacts.store import ArtifactStore
from nemoforge.config import GateConfig
from nemoforge.stats import ratio


@dataclass(frozen=True)
class GateOutcome:
    """The gate's decision: ``passed`` and one line per check (``"ok: ..."`` / ``"fail: ..."``)."""

    passed: bool
    checks: list[str] = field(default_factory=list)

    @property
    def failed(self) -> list[str]:
        """The failed criteria, without the ``"fail: "`` prefix."""
        return [c.removeprefix("fail: ") for c in self.checks if c.startswith("fail: ")]


@dataclass(frozen=True)
class ChampionBaseline:
    """The current champion's metrics measured like the child's, or why there are none.

    Attributes:
        version: its registry version.
        metrics: its eval metrics under the current eval settings; None when the comparison is refused.
        note: how the metrics were had (recorded, re-evaluated) or why the comparison is refused.
    """

    version: Any
    metrics: dict[str, float] | None
    note: str


def champion_baseline(
    record: dict[str, Any] | None,
    eval_settings: str,
    store: ArtifactStore,
    measure: Callable[[str], dict[str, float]],
) -> ChampionBaseline | None:
    """The champion's metrics to compare with: recorded ones when measured under ``eval_settings``, else re-measured.

    Args:
        record: the champion's record (``version``, ``model_uri``, ``metrics``, ``eval_settings``), None: no champion.
        eval_settings: digest of the current eval settings (:func:`~nemoforge.stages.eval.stage.eval_settings_digest`).
        store: where the champion's model is fetched from.
        measure: evaluates a model URI under the current settings and returns its metrics.

    Returns:
        None without a champion; otherwise the baseline, whose ``metrics`` are None when the settings differ
        and the champion's model cannot be fetched (the note says so).
    """
    if record is None:
        return None
    version, recorded = record.get("version"), record.get("eval_settings")
    if recorded == eval_settings:
        return ChampionBaseline(version, record.get("metrics", {}), "recorded under the current eval settings")
    was = f"recorded under eval settings {recorded[:12]}" if recorded else "recorded without eval settings"
    model_uri = record.get("model_uri")
    if not model_uri or not store.exists(model_uri):
        reason = f"{was}, not the current {eval_settings[:12]}, and its model {model_uri} is not in the store"
        return ChampionBaseline(version, None, f"comparison refused: {reason}")
    return ChampionBaseline(version, measure(model_uri), f"re-evaluated under the current eval settings ({was})")


def _g(value: float | None) -> str:
    return "not measured" if value is None else f"{value:.4g}"


def _ci(metrics: dict[str, float], name: str) -> str:
    low, high = metrics.get(f"{name}_ci_low"), metrics.get(f"{name}_ci_high", float("inf"))
    return "" if low is None else f" (95% CI {low:.4g} to {high:.4g})"


def promotion_gate(metrics: dict[str, float], gate: GateConfig, champion: ChampionBaseline | None) -> GateOutcome:
    """Apply ``gate`` to the eval ``metrics`` against the ``champion`` baseline (None: no champion yet).

    Args:
        metrics: the eval stage's metrics: child ``<m>``, parent ``parent_<m>``, ``speedup`` and the
            ``_ci_low``/``_ci_high`` of each (shown in the check lines).
        gate: the criteria; a criterion left at its default (0, empty, False) is not checked.
        champion: see :func:`champion_baseline`.

    Returns:
        The outcome. Retention of ``m`` passes when ``child >= fraction * parent`` (the point estimates), so
        a parent at 0 is retained by any child; a metric that was not measured fails its criterion; against
        the champion the child must be strictly better (a tie keeps the champion).
    """
    checks: list[str] = []

    def check(ok: bool, text: str) -> None:
        checks.append(f"{'ok' if ok else 'fail'}: {text}")

    def at_least(name: str, floor: float, label: str | None = None) -> None:
        value = metrics.get(name)
        ok = value is not None and value >= floor
        check(ok, f"{label or name}={_g(value)}{_ci(metrics, name) if value is not None else ''} >= {floor:.4g}")

    value = metrics.get(gate.metric)
    if gate.min_metric > 0:
        at_least(gate.metric, gate.min_metric)
    if gate.min_decode_tokens_per_s > 0:
        at_least("decode_tokens_per_s", gate.min_decode_tokens_per_s)
    for name, fraction in gate.min_retention.items():
        child, parent = metrics.get(name), metrics.get(f"parent_{name}")
        if child is None or parent is None:
            check(False, f"retention {name}: not measured (child {_g(child)}, parent {_g(parent)})")
        elif parent == 0:
            check(True, f"retention {name}: parent 0, nothing to lose (child {_g(child)})")
        else:
            kept = ratio(child, parent)
            ci = _ci(metrics, f"retention_{name}")
            check(kept >= fraction, f"retention {name}={kept:.4g}{ci} >= {fraction:.4g} (child {child:.4g}, parent {parent:.4g})")
    if gate.min_speedup > 0:
        at_least("speedup", gate.min_speedup, "decode speedup")
    if gate.min_toggle_on > 0:
        at_least("toggle_on", gate.min_toggle_on)
    if gate.min_toggle_off > 0:
        at_least("toggle_off", gate.min_toggle_off)
    if gate.beat_champion:
        _against_champion(check, gate.metric, value, champion)
    return GateOutcome(all(c.startswith("ok") for c in checks), checks)


def _against_champion(
    check: Callable[[bool, str], None], name: str, value: float | None, champion: ChampionBaseline | None
) -> None:
    if champion is None:
        check(True, "no champion yet")
        return
    who = f"champion v{champion.version}"
    if champion.metrics is None:
        check(False, f"{who}: {champion.note}")
        return
    best = champion.metrics.get(name)
    if value is None or best is None:
        check(False, f"{name}={_g(value)} vs {who} {_g(best)}: not measured ({champion.note})")
    elif value == best:
        check(False, f"{name}={value:.4g} ties {who} {best:.4g}: a tie keeps the champion ({champion.note})")
    else:
        check(value > best, f"{name}={value:.4g} > {who} {best:.4g} ({champion.note})")
