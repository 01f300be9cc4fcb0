"""The TrainJob launcher against a local Kubernetes API stand-in that checks every request exactly."""

from __future__ import annotations

import json
import os
import signal
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from nemoforge.artifacts import store_for
from nemoforge.cluster.launcher import KubeAPI, TrainJobFailed, TrainJobs, launch_stage, run_trainjob
from nemoforge.cluster.trainjob import build_trainjob
from nemoforge.config import load_recipe
from nemoforge.errors import NemoforgeError
from nemoforge.runner.index import StepIndex, result_to_json
from nemoforge.runner.stage_table import stage_key
from nemoforge.stages.result import StageResult

NS = "team-a"
COLLECTION = f"/apis/trainer.kubeflow.org/v1alpha1/namespaces/{NS}/trainjobs"
TOKEN = "sa-token-abc"
DELETE_BODY = {"apiVersion": "v1", "kind": "DeleteOptions", "propagationPolicy": "Foreground"}


def condition(kind: str, reason: str, message: str) -> dict:
    return {"type": kind, "status": "True", "reason": reason, "message": message,
            "lastTransitionTime": "2026-08-01T00:00:00Z"}


RUNNING = {"jobsStatus": [{"name": "node", "active": 2, "ready": 2, "succeeded": 0, "failed": 0, "suspended": 0}],
           "trainerStatus": {"progressPercentage": 40, "estimatedRemainingSeconds": 3600}}
COMPLETE = {"conditions": [condition("Complete", "JobsCompleted", "all jobs succeeded")],
            "jobsStatus": [{"name": "node", "active": 0, "ready": 0, "succeeded": 2, "failed": 0, "suspended": 0}]}
FAILED = {"conditions": [condition("Failed", "JobsFailed", "node-1 exited 1: CUDA out of memory")]}


class FakeKube:
    """Answers from a script of ``(method, path, expected body or None, status, response)`` steps, in order.

    A request that differs from the next step (method, path, body, bearer token) gets 400 and is recorded
    as a mismatch; the test then fails on ``mismatches``.
    """

    def __init__(self, script: list[tuple]):
        self.script = list(script)
        self.seen: list[tuple[str, str, dict | None]] = []
        self.mismatches: list[str] = []
        self.on_request = None

    def handle(self, handler: BaseHTTPRequestHandler) -> None:
        length = int(handler.headers.get("Content-Length") or 0)
        body = json.loads(handler.rfile.read(length)) if length else None
        self.seen.append((handler.command, handler.path, body))
        if self.on_request:
            self.on_request(len(self.seen))
        if not self.script:
            self.mismatches.append(f"unexpected {handler.command} {handler.path}")
            return self._reply(handler, 400, {"message": "unexpected"})
        method, path, expected, status, response = self.script.pop(0)
        problems = []
        if (handler.command, handler.path) != (method, path):
            problems.append(f"got {handler.command} {handler.path}, want {method} {path}")
        if expected is not None and body != expected:
            problems.append(f"{method} {path}: body differs")
        if handler.headers.get("Authorization") != f"Bearer {TOKEN}":
            problems.append("missing bearer token")
        if body is not None and handler.headers.get("Content-Type") != "application/json":
            problems.append("body without Content-Type: application/json")
        if problems:
            self.mismatches += problems
            return self._reply(handler, 400, {"message": "; ".join(problems)})
        self._reply(handler, status, response)

    @staticmethod
    def _reply(handler: BaseHTTPRequestHandler, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)


@pytest.fixture
def kube(tmp_path: Path) -> Iterator[tuple[FakeKube, KubeAPI]]:
    fake = FakeKube([])

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            fake.handle(self)

        do_POST = do_DELETE = do_GET

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    try:
        yield fake, KubeAPI(f"http://127.0.0.1:{server.server_port}", token_file=token_file, timeout_s=5)
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def job() -> dict:
    recipe = load_recipe("llama-3.3-70b-super")
    return build_trainjob(recipe, "distill", "run-1", {}, image="img:1", namespace=NS)


def with_status(job: dict, status: dict) -> dict:
    return {**job, "status": status}


def test_creates_follows_and_returns_on_complete(kube, job):
    fake, api = kube
    name = job["metadata"]["name"]
    fake.script = [
        ("POST", COLLECTION, job, 201, job),
        ("GET", f"{COLLECTION}/{name}", None, 200, job),
        ("GET", f"{COLLECTION}/{name}", None, 500, {"message": "etcdserver: leader changed"}),
        ("GET", f"{COLLECTION}/{name}", None, 200, with_status(job, RUNNING)),
        ("GET", f"{COLLECTION}/{name}", None, 200, with_status(job, COMPLETE)),
    ]
    lines: list[str] = []
    final = run_trainjob(TrainJobs(api, NS), job, timeout_s=60, poll_s=0.5, log=lines.append, sleep=lambda s: None)
    assert fake.mismatches == [] and fake.script == []
    assert final["status"] == COMPLETE
    assert lines[0] == f"created TrainJob {NS}/{name}"
    assert f"TrainJob {NS}/{name}: node: active 2 ready 2 succeeded 0 failed 0; progress 40%, ~3600 s left" in lines
    assert any("status read failed, retrying" in line and "leader changed" in line for line in lines)
    assert lines[-1] == f"TrainJob {NS}/{name}: Complete; node: active 0 ready 0 succeeded 2 failed 0"
    assert TOKEN not in "\n".join(lines)


def test_failed_job_fails_the_task_and_is_kept_for_its_logs(kube, job):
    fake, api = kube
    name = job["metadata"]["name"]
    fake.script = [
        ("POST", COLLECTION, job, 201, job),
        ("GET", f"{COLLECTION}/{name}", None, 200, with_status(job, FAILED)),
    ]
    with pytest.raises(TrainJobFailed, match="failed: JobsFailed: node-1 exited 1: CUDA out of memory"):
        run_trainjob(TrainJobs(api, NS), job, timeout_s=60, poll_s=0.5, log=lambda s: None, sleep=lambda s: None)
    assert fake.mismatches == [] and fake.script == []  # no DELETE


def test_sigterm_deletes_the_job(kube, job):
    fake, api = kube
    name = job["metadata"]["name"]
    fake.script = [
        ("POST", COLLECTION, job, 201, job),
        ("GET", f"{COLLECTION}/{name}", None, 200, with_status(job, RUNNING)),
        ("DELETE", f"{COLLECTION}/{name}", DELETE_BODY, 200, {"kind": "Status", "status": "Success"}),
    ]
    fake.on_request = lambda n: n == 2 and os.kill(os.getpid(), signal.SIGTERM)  # the run is cancelled mid-wait
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as exit_info:
        run_trainjob(TrainJobs(api, NS), job, timeout_s=60, poll_s=0.05, log=lambda s: None)
    assert exit_info.value.code == 143
    assert fake.mismatches == [] and fake.script == []
    assert signal.getsignal(signal.SIGTERM) == before


def test_timeout_deletes_the_job(kube, job):
    fake, api = kube
    name = job["metadata"]["name"]
    fake.script = [
        ("POST", COLLECTION, job, 201, job),
        ("GET", f"{COLLECTION}/{name}", None, 200, with_status(job, RUNNING)),
        ("GET", f"{COLLECTION}/{name}", None, 200, with_status(job, RUNNING)),
        ("DELETE", f"{COLLECTION}/{name}", DELETE_BODY, 404, {"kind": "Status", "reason": "NotFound"}),
    ]
    now = iter([0.0, 5.0, 11.0])
    with pytest.raises(NemoforgeError, match=r"no outcome after 10 s \(resources.trainer.timeout_s\)"):
        run_trainjob(TrainJobs(api, NS), job, timeout_s=10, poll_s=1, log=lambda s: None, sleep=lambda s: None,
                     clock=lambda: next(now))
    assert fake.mismatches == [] and fake.script == []


def test_retry_recreates_a_failed_job_and_follows_a_running_one(kube, job):
    fake, api = kube
    name = job["metadata"]["name"]
    conflict = {"kind": "Status", "reason": "AlreadyExists", "message": f'trainjobs "{name}" already exists'}
    fake.script = [
        ("POST", COLLECTION, job, 409, conflict),
        ("GET", f"{COLLECTION}/{name}", None, 200, with_status(job, FAILED)),
        ("DELETE", f"{COLLECTION}/{name}", DELETE_BODY, 200, {}),
        ("GET", f"{COLLECTION}/{name}", None, 404, {"reason": "NotFound"}),
        ("POST", COLLECTION, job, 201, job),
        ("GET", f"{COLLECTION}/{name}", None, 200, with_status(job, COMPLETE)),
        # a second retry while it runs: attach, no new job
        ("POST", COLLECTION, job, 409, conflict),
        ("GET", f"{COLLECTION}/{name}", None, 200, with_status(job, RUNNING)),
        ("GET", f"{COLLECTION}/{name}", None, 200, with_status(job, COMPLETE)),
    ]
    for _ in range(2):
        run_trainjob(TrainJobs(api, NS), job, timeout_s=60, poll_s=0.1, log=lambda s: None, sleep=lambda s: None)
    assert fake.mismatches == [] and fake.script == []


def test_refused_job_is_a_one_line_error(kube, job):
    fake, api = kube
    invalid = {"kind": "Status", "reason": "Invalid", "message": 'TrainJob.trainer.kubeflow.org "x" is invalid: spec.runtimeRef: Not found'}
    fake.script = [("POST", COLLECTION, job, 422, invalid),
                   ("DELETE", f"{COLLECTION}/{job['metadata']['name']}", DELETE_BODY, 404, {})]
    with pytest.raises(NemoforgeError, match=f"POST {COLLECTION}: 422 .*spec.runtimeRef: Not found"):
        run_trainjob(TrainJobs(api, NS), job, timeout_s=60, poll_s=0.1, log=lambda s: None, sleep=lambda s: None)
    assert fake.mismatches == []


@pytest.mark.parametrize(("stage", "inputs"), [
    ("cpt", {"model": {"uri": "m", "digest": "d1"}, "corpus": {"uri": "c", "digest": "d2"}}),
    ("rl", {"model": {"uri": "m", "digest": "d1"}, "data": {"uri": "s", "digest": "d3"}}),  # sft's model and data
])
def test_launch_stage_end_to_end_reads_the_workers_result(kube, tmp_path, monkeypatch, capsys, stage, inputs):
    """The launcher task's body: env config, the job from the recipe, then the model ref from the index."""
    fake, api = kube
    recipe = load_recipe("llama-3.1-8b", [f"storage.artifact_root={tmp_path / 'store'}", "resources.trainer.poll_s=0.01"])
    expected = build_trainjob(recipe, stage, "run-7", inputs, image="img:2", namespace=NS,
                              owner={"name": "launch-pod", "uid": "uid-7"})
    assert expected["spec"]["trainer"]["args"][:2] == ["--stage", stage]
    name = expected["metadata"]["name"]
    fake.script = [
        ("POST", COLLECTION, expected, 201, expected),
        ("GET", f"{COLLECTION}/{name}", None, 200, with_status(expected, COMPLETE)),
    ]
    # what the workers leave behind (nemoforge.runner.execute.execute_stage on rank 0)
    result = StageResult(outputs={"model": f"s3://b/run-7/{stage}/model"}, digests={"model": "e" * 64},
                         tags={"params": "6.0e9", "device": "cuda"})
    StepIndex(store_for(recipe), stage, stage_key(recipe, stage, inputs)).write(
        state="done", output_uri=f"s3://b/run-7/{stage}", result=result_to_json(result))
    monkeypatch.setenv("NEMOFORGE_KUBE_API", api.server)
    monkeypatch.setenv("NEMOFORGE_KUBE_TOKEN", TOKEN)
    monkeypatch.setenv("NEMOFORGE_NAMESPACE", NS)
    monkeypatch.setenv("NEMOFORGE_POD_NAME", "launch-pod")
    monkeypatch.setenv("NEMOFORGE_POD_UID", "uid-7")
    refs = launch_stage(stage, recipe, "run-7", inputs, "img:2")
    assert fake.mismatches == [] and fake.script == []
    assert refs == {"model": {"uri": f"s3://b/run-7/{stage}/model", "digest": "e" * 64, "params": "6.0e9"}}
    assert TOKEN not in capsys.readouterr().out
