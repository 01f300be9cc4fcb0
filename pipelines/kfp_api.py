"""Submit and schedule a compiled recipe pipeline through the Kubeflow Pipelines v2beta1 API (``kfp.Client``).

Every call is idempotent by name, so the chart's schedule Job can run on every install and upgrade:
the pipeline ``nemoforge-<recipe>`` is created once and gets a new version per publish; the recurring
run of the same name is deleted and created again on the new version (``max_concurrency=1``,
``no_catchup=True``), leaving exactly one schedule.

Auth: a bearer token from ``NEMOFORGE_KFP_TOKEN``; else the projected service-account token that
multi-user KFP expects (``KF_PIPELINES_SA_TOKEN_PATH``, default
``/var/run/secrets/kubeflow/pipelines/token``) when that file exists; else ``kfp.Client``'s own
defaults (in-cluster service, kubeconfig). Tokens are never printed or logged.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nemoforge.config import Recipe
from nemoforge.errors import RecipeError

if TYPE_CHECKING:
    import kfp

TOKEN_ENV = "NEMOFORGE_KFP_TOKEN"
SA_TOKEN_DEFAULT = "/var/run/secrets/kubeflow/pipelines/token"


@dataclass(frozen=True)
class Published:
    """A pipeline version on the server."""

    pipeline_name: str
    pipeline_id: str
    version_name: str
    version_id: str


def pipeline_name(recipe: Recipe) -> str:
    """The pipeline's (and recurring run's) name on the server: ``nemoforge-<recipe>``."""
    return f"nemoforge-{recipe.name}"


def check_cron(cron: str) -> str:
    """A KFP cron expression has 6 fields, seconds first (robfig/cron): ``"0 0 3 * * 0"`` is Sundays 03:00.

    Raises:
        RecipeError: not 6 fields.
    """
    fields = cron.split()
    if len(fields) != 6:
        hint = f' (with seconds: "0 {cron.strip()}")' if len(fields) == 5 else ""
        raise RecipeError(f"--cron {cron!r} has {len(fields)} fields; KFP wants 6, seconds first{hint}")
    return " ".join(fields)


def check_cluster_recipe(recipe: Recipe) -> None:
    """A run on a cluster needs shared storage and tracking: an ``s3://`` artifact root, an HTTP MLflow.

    Raises:
        RecipeError: naming the ``--set`` that fixes it.
    """
    root = recipe.storage.artifact_root or ""
    if not root.startswith("s3://"):
        raise RecipeError(
            f"storage.artifact_root={root or None!r}: pods of a cluster run share no disk; "
            "use --set storage.artifact_root=s3://BUCKET/PREFIX"
        )
    uri = recipe.tracking.mlflow_uri or ""
    if not uri.startswith(("http://", "https://")):
        raise RecipeError(
            f"tracking.mlflow_uri={uri or None!r}: a cluster run logs to an MLflow server; "
            "use --set tracking.mlflow_uri=http://MLFLOW:5000"
        )


def connect(host: str | None, namespace: str | None = None) -> kfp.Client:
    """A ``kfp.Client`` for ``host`` with the credentials described in the module docstring."""
    import kfp
    from kfp.client.set_volume_credentials import ServiceAccountTokenVolumeCredentials

    warnings.filterwarnings("ignore", category=FutureWarning, module="kfp")
    kwargs: dict[str, Any] = {"host": host}
    if namespace:
        kwargs["namespace"] = namespace
    if token := os.environ.get(TOKEN_ENV):
        kwargs["existing_token"] = token
    elif Path(os.environ.get("KF_PIPELINES_SA_TOKEN_PATH", SA_TOKEN_DEFAULT)).is_file():
        kwargs["credentials"] = ServiceAccountTokenVolumeCredentials()
    return kfp.Client(**kwargs)


def _equals(key: str, value: str) -> str:
    return json.dumps({"predicates": [{"operation": "EQUALS", "key": key, "stringValue": value}]})


def publish(client: kfp.Client, recipe: Recipe, package: Path, namespace: str | None = None) -> Published:
    """Upload ``package`` as a new version of ``nemoforge-<recipe>`` (creating the pipeline the first time).

    The version is named ``<recipe>-<UTC time>-<sha256 of the package, 8 hex>``.
    """
    name = pipeline_name(recipe)
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    version_name = f"{recipe.name}-{stamp}-{hashlib.sha256(package.read_bytes()).hexdigest()[:8]}"
    found = client.list_pipelines(filter=_equals("display_name", name), namespace=namespace).pipelines or []
    if found:
        pipeline_id = found[0].pipeline_id
        version = client.upload_pipeline_version(
            str(package), version_name, pipeline_id=pipeline_id, description=recipe.description or None
        )
        return Published(name, pipeline_id, version_name, version.pipeline_version_id)
    pipeline = client.upload_pipeline(
        str(package), pipeline_name=name, description=recipe.description or None, namespace=namespace
    )
    versions = client.list_pipeline_versions(pipeline.pipeline_id, page_size=1, sort_by="created_at desc")
    version = versions.pipeline_versions[0]
    return Published(name, pipeline.pipeline_id, version.display_name, version.pipeline_version_id)


def experiment_id(client: kfp.Client, experiment: str, namespace: str | None = None) -> str:
    """The id of ``experiment``, created when missing."""
    return client.create_experiment(experiment, namespace=namespace).experiment_id


def _force_params(force: bool) -> dict[str, Any] | None:
    """The run's pipeline parameters: ``force`` only when set (else the compiled default, false, applies)."""
    return {"force": True} if force else None


def submit(
    client: kfp.Client,
    recipe: Recipe,
    published: Published,
    experiment: str,
    namespace: str | None = None,
    force: bool = False,
) -> Any:
    """Start one run of ``published`` in ``experiment``; returns the server's run (``run_id``, ``display_name``).

    ``force``: run every stage even when the inputs equal the champion's (pipeline parameter ``force``).
    """
    run_name = f"{recipe.name}-{datetime.now(UTC).strftime('%Y%m%d-%H%M%S')}"
    return client.run_pipeline(
        experiment_id(client, experiment, namespace),
        run_name,
        pipeline_id=published.pipeline_id,
        version_id=published.version_id,
        params=_force_params(force),
        service_account=recipe.resources.service_account,
    )


def _recurring_runs(client: kfp.Client, name: str | None, exp_id: str | None, namespace: str | None) -> list[Any]:
    runs, token = [], ""
    while True:
        page = client.list_recurring_runs(
            page_token=token,
            page_size=100,
            experiment_id=exp_id,
            namespace=namespace,
            filter=_equals("display_name", name) if name else None,
        )
        runs += page.recurring_runs or []
        token = page.next_page_token
        if not token:
            return runs


def schedule(
    client: kfp.Client,
    recipe: Recipe,
    published: Published,
    cron: str,
    experiment: str,
    namespace: str | None = None,
    force: bool = False,
) -> tuple[Any, int]:
    """Replace the recurring run ``nemoforge-<recipe>`` of ``experiment`` with one on ``published``.

    Each scheduled run first compares its inputs with the champion's and ends early when they match;
    ``force`` sets the pipeline parameter ``force`` on every scheduled run (retrain every time).

    Returns:
        The new recurring run and how many old ones of that name were deleted.
    """
    cron = check_cron(cron)
    exp_id = experiment_id(client, experiment, namespace)
    name = pipeline_name(recipe)
    old = _recurring_runs(client, name, exp_id, None)
    for run in old:
        client.delete_recurring_run(run.recurring_run_id)
    created = client.create_recurring_run(
        exp_id,
        name,
        description=f"{recipe.description or recipe.name} (version {published.version_name})",
        cron_expression=cron,
        max_concurrency=1,
        no_catchup=True,
        pipeline_id=published.pipeline_id,
        version_id=published.version_id,
        enabled=True,
        params=_force_params(force),
        service_account=recipe.resources.service_account,
    )
    return created, len(old)


def list_schedules(client: kfp.Client, experiment: str | None, namespace: str | None = None) -> list[dict[str, Any]]:
    """``[{name, id, cron, mode, status, pipeline_version_id, experiment_id}]`` of the recurring runs."""
    exp_id = client.get_experiment(experiment_name=experiment, namespace=namespace).experiment_id if experiment else None
    rows = []
    for run in _recurring_runs(client, None, exp_id, namespace if exp_id is None else None):
        cron = run.trigger.cron_schedule.cron if run.trigger and run.trigger.cron_schedule else None
        ref = run.pipeline_version_reference
        rows.append(
            {
                "name": run.display_name,
                "id": run.recurring_run_id,
                "cron": cron,
                "mode": run.mode,
                "status": run.status,
                "pipeline_version_id": ref.pipeline_version_id if ref else None,
                "experiment_id": run.experiment_id,
            }
        )
    return rows


def disable_schedule(client: kfp.Client, name: str, experiment: str | None, namespace: str | None = None) -> int:
    """Disable every recurring run named ``name``; returns how many.

    Raises:
        RecipeError: none has that name.
    """
    exp_id = client.get_experiment(experiment_name=experiment, namespace=namespace).experiment_id if experiment else None
    runs = _recurring_runs(client, name, exp_id, namespace if exp_id is None else None)
    if not runs:
        raise RecipeError(f"no recurring run named {name!r}: see `nemoforge schedule --list`")
    for run in runs:
        client.disable_recurring_run(run.recurring_run_id)
    return len(runs)
