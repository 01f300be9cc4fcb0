"""Run a training stage as a TrainJob from inside a pipeline task: create it, follow it, clean up.

:class:`KubeAPI` is the whole Kubernetes client: JSON over the REST API with the pod's service-account
token (re-read on every call: projected tokens rotate) or, outside a cluster, ``NEMOFORGE_KUBE_API``
and ``NEMOFORGE_KUBE_TOKEN`` from the environment; no kubeconfig, no client library. The service
account needs create/get/delete on ``trainjobs`` (the chart's ``workloads`` Role grants it).

:func:`run_trainjob` is idempotent, so a retried task picks up where the last attempt was: a job of
the same name that completed is taken as done, a running one is followed, a failed one is deleted
and created again (the stage resumes from its checkpoint). The job is deleted when the wait ends
without an outcome: SIGTERM (the run was cancelled), a timeout, or any error of the launcher itself.
A failed job is kept for its logs (``kubectl logs -l jobset.sigs.k8s.io/jobset-name=NAME``).
"""

from __future__ import annotations

import json
import os
import signal
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from nemoforge.artifacts import store_for
from nemoforge.cluster.trainjob import GROUP, PLURAL, VERSION, build_trainjob
from nemoforge.config import Recipe
from nemoforge.errors import NemoforgeError
from nemoforge.runner.index import Ref, StepIndex, result_from_json
from nemoforge.runner.stage_table import stage_entry, stage_key

SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")


class KubeAPIError(NemoforgeError):
    """The API server answered with an error status (``status``: the HTTP code; 0: no answer)."""

    def __init__(self, status: int, method: str, path: str, message: str):
        super().__init__(f"Kubernetes API {method} {path}: {status or 'no answer'} {message}".rstrip())
        self.status = status


class TrainJobFailed(NemoforgeError):
    """The TrainJob ended with condition Failed (or disappeared while we waited)."""


class KubeAPI:
    """JSON requests to one Kubernetes API server.

    Args:
        server: ``https://host:port`` of the API server.
        token_file: file holding the bearer token (read on every request), or None.
        token: a bearer token given directly (``NEMOFORGE_KUBE_TOKEN``), used when ``token_file`` is None.
        ca_file: CA bundle for the server's certificate (None: the system's).
        timeout_s: seconds per request.
    """

    def __init__(
        self,
        server: str,
        *,
        token_file: Path | None = None,
        token: str | None = None,
        ca_file: Path | None = None,
        timeout_s: float = 30.0,
    ):
        self.server = server.rstrip("/")
        self._token_file = token_file
        self._token = token
        self._context = ssl.create_default_context(cafile=str(ca_file)) if ca_file else None
        self.timeout_s = timeout_s

    @classmethod
    def from_env(cls) -> KubeAPI:
        """In a pod: the service-account token and CA; else ``NEMOFORGE_KUBE_API`` (+ ``NEMOFORGE_KUBE_TOKEN``).

        Raises:
            NemoforgeError: neither is available.
        """
        if server := os.environ.get("NEMOFORGE_KUBE_API"):
            ca = os.environ.get("NEMOFORGE_KUBE_CA")
            return cls(server, token=os.environ.get("NEMOFORGE_KUBE_TOKEN"), ca_file=Path(ca) if ca else None)
        host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        if host and (SA_DIR / "token").is_file():
            host = f"[{host}]" if ":" in host else host
            return cls(f"https://{host}:{port}", token_file=SA_DIR / "token", ca_file=SA_DIR / "ca.crt")
        raise NemoforgeError(
            "no Kubernetes API: run in a pod with a service-account token, or set NEMOFORGE_KUBE_API "
            "(and NEMOFORGE_KUBE_TOKEN)"
        )

    def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        """``method path`` with a JSON body; the decoded JSON answer.

        Raises:
            KubeAPIError: an HTTP error status (with the server's ``message``), or no answer (status 0).
        """
        headers = {"Accept": "application/json"}
        token = self._token_file.read_text().strip() if self._token_file else self._token
        if token:
            headers["Authorization"] = f"Bearer {token}"
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        req = urllib.request.Request(self.server + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s, context=self._context) as resp:
                payload = resp.read()
        except urllib.error.HTTPError as err:
            try:
                message = json.loads(err.read() or b"{}").get("message", "")
            except ValueError:
                message = err.reason
            raise KubeAPIError(err.code, method, path, message) from None
        except (urllib.error.URLError, TimeoutError, ConnectionError) as err:
            raise KubeAPIError(0, method, path, str(getattr(err, "reason", err))) from None
        return json.loads(payload) if payload else {}


def trainjobs_path(namespace: str, name: str | None = None) -> str:
    path = f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}"
    return f"{path}/{name}" if name else path


def trainjob_outcome(job: dict[str, Any]) -> tuple[str | None, str]:
    """``("Complete"|"Failed"|None, message)`` from ``status.conditions`` (None: still going)."""
    for cond in job.get("status", {}).get("conditions", []):
        if cond.get("type") in ("Complete", "Failed") and cond.get("status") == "True":
            return cond["type"], f"{cond.get('reason', '')}: {cond.get('message', '')}".strip(": ")
    return None, ""


def describe_status(job: dict[str, Any]) -> str:
    """One line: true conditions, child jobs (active/ready/succeeded/failed) and trainer progress."""
    status = job.get("status", {})
    parts = [c["type"] for c in status.get("conditions", []) if c.get("status") == "True"]
    for js in status.get("jobsStatus", []):
        parts.append(
            f"{js['name']}: active {js.get('active', 0)} ready {js.get('ready', 0)} "
            f"succeeded {js.get('succeeded', 0)} failed {js.get('failed', 0)}"
        )
    trainer = status.get("trainerStatus", {})
    if "progressPercentage" in trainer:
        eta = trainer.get("estimatedRemainingSeconds")
        parts.append(f"progress {trainer['progressPercentage']}%" + (f", ~{eta} s left" if eta is not None else ""))
    return "; ".join(parts) or "pending (no status yet)"


@contextmanager
def _sigterm_raises() -> Iterator[None]:
    """Turn SIGTERM (what a cancelled run's pod receives) into SystemExit(143) so cleanup runs."""

    def handler(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class TrainJobs:
    """Create, read and delete the TrainJobs of one namespace."""

    def __init__(self, api: KubeAPI, namespace: str):
        self.api, self.namespace = api, namespace

    def create(self, job: dict[str, Any]) -> dict[str, Any]:
        return self.api.request("POST", trainjobs_path(self.namespace), job)

    def get(self, name: str) -> dict[str, Any]:
        return self.api.request("GET", trainjobs_path(self.namespace, name))

    def delete(self, name: str) -> None:
        """Delete the job and (foreground) its JobSet and pods; a job already gone is fine."""
        body = {"apiVersion": "v1", "kind": "DeleteOptions", "propagationPolicy": "Foreground"}
        try:
            self.api.request("DELETE", trainjobs_path(self.namespace, name), body)
        except KubeAPIError as err:
            if err.status != 404:
                raise

    def wait_gone(self, name: str, timeout_s: float, poll_s: float, sleep: Callable[[float], None]) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                self.get(name)
            except KubeAPIError as err:
                if err.status == 404:
                    return
                raise
            sleep(poll_s)
        raise NemoforgeError(f"TrainJob {self.namespace}/{name} was not deleted within {timeout_s:.0f} s")


def run_trainjob(
    jobs: TrainJobs,
    job: dict[str, Any],
    *,
    timeout_s: float,
    poll_s: float,
    log: Callable[[str], None] = print,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> dict[str, Any]:
    """Create ``job`` (or attach to the one of that name), wait for its outcome, return its final object.

    Status reads that fail with no answer or a 5xx are retried until the timeout (an API server
    restart must not fail a week-long training).

    Raises:
        TrainJobFailed: the job failed, or was deleted by someone else while we waited.
        NemoforgeError: no outcome within ``timeout_s`` (the job is deleted), or the API refused the job.
        SystemExit: SIGTERM arrived (the job is deleted first).
    """
    name = job["metadata"]["name"]
    where = f"TrainJob {jobs.namespace}/{name}"
    finished = False
    with _sigterm_raises():
        try:
            try:
                jobs.create(job)
                log(f"created {where}")
            except KubeAPIError as err:
                if err.status != 409:
                    raise
                existing = jobs.get(name)
                outcome, _ = trainjob_outcome(existing)
                if outcome == "Failed":  # a retry: start the stage again (it resumes from its checkpoint)
                    log(f"{where} exists and failed: deleting it and creating it again")
                    jobs.delete(name)
                    jobs.wait_gone(name, timeout_s=600, poll_s=poll_s, sleep=sleep)
                    jobs.create(job)
                else:
                    log(f"{where} exists ({outcome or 'running'}): following it")
            log(f"pods: kubectl -n {jobs.namespace} logs -f -l jobset.sigs.k8s.io/jobset-name={name}")
            deadline = clock() + timeout_s
            last = ""
            while True:
                try:
                    current = jobs.get(name)
                except KubeAPIError as err:
                    if err.status == 404:
                        finished = True
                        raise TrainJobFailed(f"{where} was deleted while the pipeline waited for it") from None
                    if err.status and err.status < 500:
                        raise
                    log(f"status read failed, retrying: {err}")
                else:
                    line = describe_status(current)
                    if line != last:
                        log(f"{where}: {line}")
                        last = line
                    outcome, message = trainjob_outcome(current)
                    if outcome == "Complete":
                        finished = True
                        return current
                    if outcome == "Failed":
                        finished = True
                        raise TrainJobFailed(f"{where} failed: {message}")
                if clock() >= deadline:
                    raise NemoforgeError(f"{where} had no outcome after {timeout_s:.0f} s (resources.trainer.timeout_s)")
                sleep(poll_s)
        finally:
            if not finished:
                log(f"deleting {where}")
                jobs.delete(name)


def launcher_pod_from_env() -> tuple[str, dict[str, str] | None]:
    """The launcher pod's namespace and ``{"name", "uid"}`` (set by the pipeline through the downward API).

    Raises:
        NemoforgeError: no namespace is known.
    """
    namespace = os.environ.get("NEMOFORGE_NAMESPACE")
    if not namespace and (SA_DIR / "namespace").is_file():
        namespace = (SA_DIR / "namespace").read_text().strip()
    if not namespace:
        raise NemoforgeError("no namespace for the TrainJob: set NEMOFORGE_NAMESPACE")
    name, uid = os.environ.get("NEMOFORGE_POD_NAME"), os.environ.get("NEMOFORGE_POD_UID")
    return namespace, ({"name": name, "uid": uid} if name and uid else None)


def finished_stage_refs(stage: str, recipe: Recipe, run_name: str, inputs: dict[str, Ref]) -> dict[str, Ref]:
    """The references of the result the workers recorded in the step index (``index/<stage>/<key>.json``), by
    name (:meth:`~nemoforge.runner.stage_table.StageEntry.output_refs`: ``model``).

    Raises:
        NemoforgeError: the job completed but the index holds no finished result for this step.
    """
    store = store_for(recipe)
    entry = StepIndex(store, stage, stage_key(recipe, stage, inputs)).read()
    if not entry or entry.get("state") != "done":
        raise NemoforgeError(
            f"the {stage} TrainJob completed but {store.join('index', stage)} has no finished entry for its key: "
            "did every worker see the same storage.artifact_root?"
        )
    return stage_entry(stage).output_refs(recipe, run_name, result_from_json(entry["result"]), inputs)


def launch_stage(stage: str, recipe: Recipe, run_name: str, inputs: dict[str, Ref], image: str) -> dict[str, Ref]:
    """The body of a launcher task: run ``stage`` as a TrainJob and return its task's references (``model``)."""
    namespace, owner = launcher_pod_from_env()
    job = build_trainjob(recipe, stage, run_name, inputs, image=image, namespace=namespace, owner=owner)
    trainer = recipe.resources.trainer
    run_trainjob(TrainJobs(KubeAPI.from_env(), namespace), job, timeout_s=trainer.timeout_s, poll_s=trainer.poll_s)
    return finished_stage_refs(stage, recipe, run_name, inputs)
