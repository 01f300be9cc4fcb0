"""Lineage in MLflow 3: the only package that imports mlflow.

- :mod:`~nemoforge.lineage.runs`: :class:`Lineage` (``Lineage(tracking_uri, experiment)``): one parent run per
  pipeline run, a nested run per stage (:meth:`Lineage.stage_run` yields a :class:`StageTracker`).
- :mod:`~nemoforge.lineage.status`: :func:`pipeline_status` and :func:`pipeline_summary`, what ``nemoforge status``
  shows.
- :mod:`~nemoforge.lineage.registry`: :class:`Registry` (``Registry(tracking_uri)``): model versions and aliases.
- :mod:`~nemoforge.lineage.client`: the client, and the tags that find runs.
"""

from nemoforge.lineage.client import (
    MAX_DATASET_DIGEST_CHARS,
    TAG_INPUT_DIGEST,
    TAG_OUTCOME,
    TAG_OWNER,
    TAG_TASK_LOGS,
)
from nemoforge.lineage.registry import Registry
from nemoforge.lineage.runs import Lineage, StageTracker
from nemoforge.lineage.status import pipeline_status, pipeline_summary

__all__ = [
    "MAX_DATASET_DIGEST_CHARS",
    "TAG_INPUT_DIGEST",
    "TAG_OUTCOME",
    "TAG_OWNER",
    "TAG_TASK_LOGS",
    "Lineage",
    "Registry",
    "StageTracker",
    "pipeline_status",
    "pipeline_summary",
]
