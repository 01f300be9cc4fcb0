"""The promotion gate: whether the evaluated child becomes ``champion`` in the model registry.

The record of the current champion lives in the artifact store at ``registry/<model name>/champion.json``
(written by the runner when it moves the alias), so the eval stage decides without touching MLflow.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from nemoforge.config import GateConfig


@dataclass(frozen=True)
class GateOutcome:
    """The gate's decision: ``passed`` and one line per check (``"ok: ..."`` / ``"fail: ..."``)."""

    passed: bool
    checks: list[str] = field(default_factory=list)


def promotion_gate(metrics: dict[str, float], gate: GateConfig, champion: dict[str, Any] | None) -> GateOutcome:
    """Apply ``gate`` to the child's eval ``metrics``, against the current ``champion`` record (None: none yet).

    Checks: ``metrics[gate.metric] >= gate.min_metric``; ``decode_tokens_per_s >= gate.min_decode_tokens_per_s``;
    with ``gate.beat_champion`` and a champion holding the metric, ``metrics[gate.metric] >=`` the champion's.
    A missing metric fails its check (the outcome is recorded, never raised).
    """
    checks: list[str] = []

    def check(ok: bool, text: str) -> None:
        checks.append(f"{'ok' if ok else 'fail'}: {text}")

    value = metrics.get(gate.metric)
    check(value is not None and value >= gate.min_metric, f"{gate.metric}={value} >= floor {gate.min_metric}")
    speed = metrics.get("decode_tokens_per_s")
    check(
        speed is not None and speed >= gate.min_decode_tokens_per_s,
        f"decode_tokens_per_s={speed} >= floor {gate.min_decode_tokens_per_s}",
    )
    if gate.beat_champion:
        best = None if champion is None else champion.get("metrics", {}).get(gate.metric)
        if best is None:
            check(True, f"no champion with {gate.metric} yet")
        else:
            check(value is not None and value >= best, f"{gate.metric}={value} >= champion v{champion.get('version')} {best}")
    return GateOutcome(all(c.startswith("ok") for c in checks), checks)
