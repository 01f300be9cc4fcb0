"""``nemoforge submit`` / ``schedule`` against a local KFP API stand-in that validates every request against the
real v2beta1 Swagger spec (../shared/schemas/kfp-api) and answers like the API server would."""

from __future__ import annotations

import copy
import email.parser
import email.policy
import itertools
import json
import re
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import jsonschema
import pytest
import yaml

from nemoforge_cli.main import main

TOKEN = "kfp-bearer-xyz"
CLUSTER_SETS = [
    "--set", "tracking.mlflow_uri=http://nemoforge-mlflow.ml.svc.cluster.local:5000",
    "--set", "storage.artifact_root=s3://team-bucket/nemoforge",
]


def _jsonschema(node):
    """Swagger 2.0 -> JSON Schema: int64 travels as a string or a number (protojson), unknown fields rejected."""
    if isinstance(node, list):
        return [_jsonschema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _jsonschema(v) for k, v in node.items() if not (k in ("description", "title", "format") and isinstance(v, str))}
    if node.get("type") == "string" and node.get("format") in ("int64", "uint64"):
        out["type"] = ["string", "integer"]
    if node.get("type") == "object" and "properties" in node and "additionalProperties" not in node:
        out["additionalProperties"] = False
    return out


class FakeKFP:
    """KFP API server state (pipelines, versions, experiments, runs, recurring runs) behind the Swagger routes."""

    def __init__(self, spec: dict):
        self.defs = {name: _jsonschema(d) for name, d in spec["definitions"].items()}
        self.routes = []
        for path, ops in spec["paths"].items():
            pattern = "^" + re.sub(r"\{([^}]+)\}", lambda m: "(?P<" + m.group(1).replace(".", "_") + ">[^/:]+)",
                                   path.replace(":", r"\:")) + "$"
            for method, op in ops.items():
                self.routes.append((method.upper(), re.compile(pattern), op))
        self.errors: list[str] = []
        self.calls: list[tuple[str, str, dict, object]] = []
        self.auth: list[str | None] = []
        self.ids = (f"{i:08x}-0000-4000-8000-000000000000" for i in itertools.count(1))
        self.pipelines, self.versions, self.experiments, self.runs, self.recurring = {}, {}, {}, {}, {}

    # ----------------------------------------------------------------------------- validation
    def validator(self, ref: str) -> jsonschema.Draft7Validator:
        return jsonschema.Draft7Validator({"definitions": self.defs, "$ref": ref})

    def check(self, what: str, ref: str, payload) -> None:
        for err in self.validator(ref).iter_errors(payload):
            self.errors.append(f"{what}: {'/'.join(map(str, err.absolute_path))}: {err.message}")

    def handle(self, h: BaseHTTPRequestHandler) -> None:
        url = urlsplit(h.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        raw = h.rfile.read(int(h.headers.get("Content-Length") or 0))
        self.auth.append(h.headers.get("Authorization"))
        for method, pattern, op in self.routes:  # noqa: B007 (op is used after the break)
            match = pattern.match(url.path)
            if method == h.command and match:
                break
        else:
            self.errors.append(f"no such route {h.command} {url.path}")
            return self.reply(h, 404, {"code": 5, "message": "Not Found"})
        params = {p["name"]: p for p in op.get("parameters", [])}
        for name, value in query.items():
            if name not in params or params[name]["in"] != "query":
                self.errors.append(f"{h.command} {url.path}: undeclared query parameter {name}")
            elif params[name].get("type") == "integer" and not value.lstrip("-").isdigit():
                self.errors.append(f"{h.command} {url.path}: {name}={value!r} is not an integer")
        body = None
        if any(p["in"] == "formData" for p in params.values()):
            msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
                b"Content-Type: " + h.headers["Content-Type"].encode() + b"\r\n\r\n" + raw)
            files = {part.get_param("name", header="content-disposition"): part.get_payload(decode=True)
                     for part in msg.iter_parts()}
            if set(files) != {"uploadfile"}:
                self.errors.append(f"{url.path}: form fields {sorted(files)}, want ['uploadfile']")
            body = list(yaml.safe_load_all(files.get("uploadfile", b"{}")))  # [pipeline IR, platform spec]
        elif raw:
            body = json.loads(raw)
            (param,) = [p for p in params.values() if p["in"] == "body"]
            self.check(f"{h.command} {url.path} body", param["schema"]["$ref"], body)
        self.calls.append((h.command, url.path, query, body))
        status, payload = self.answer(h.command, op["operationId"], match.groupdict(), query, body)
        schema = op["responses"].get("200", {}).get("schema", {})
        if status == 200 and "$ref" in schema:
            self.check(f"response of {op['operationId']}", schema["$ref"], payload)  # our answers are realistic
        self.reply(h, status, payload)

    @staticmethod
    def reply(h: BaseHTTPRequestHandler, status: int, payload) -> None:
        data = json.dumps(payload).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    # --------------------------------------------------------------------------------- answers
    @staticmethod
    def filtered(items, query):
        if "filter" not in query:
            return items
        (pred,) = json.loads(query["filter"])["predicates"]
        assert pred["operation"] in ("EQUALS", 1) and pred["key"] == "display_name"
        return [i for i in items if i["display_name"] == pred["stringValue"]]

    def answer(self, method, op_id, path, query, body):
        now = "2026-08-01T03:00:00Z"
        if op_id == "HealthzService_GetHealthz":
            return 200, {"multi_user": False}
        if op_id == "PipelineService_ListPipelines":
            return 200, {"pipelines": self.filtered(list(self.pipelines.values()), query), "total_size": len(self.pipelines)}
        if op_id in ("UploadPipeline", "UploadPipelineVersion"):
            if op_id == "UploadPipeline":
                pid = next(self.ids)
                self.pipelines[pid] = {"pipeline_id": pid, "display_name": query["name"], "name": query["name"],
                                       "description": query.get("description", ""), "created_at": now,
                                       **({"namespace": query["namespace"]} if "namespace" in query else {})}
                name = query["name"]
            else:
                pid, name = query["pipelineid"], query["name"]
                if pid not in self.pipelines:
                    return 404, {"code": 5, "message": f"pipeline {pid} not found"}
            vid = next(self.ids)
            self.versions[vid] = {"pipeline_id": pid, "pipeline_version_id": vid, "display_name": name, "name": name,
                                  "created_at": f"2026-08-01T03:00:{len(self.versions):02d}Z", "pipeline_spec": body[0]}
            return 200, (self.pipelines[pid] if op_id == "UploadPipeline" else self.versions[vid])
        if op_id == "PipelineService_ListPipelineVersions":
            versions = sorted((v for v in self.versions.values() if v["pipeline_id"] == path["pipeline_id"]),
                              key=lambda v: v["created_at"], reverse=query.get("sort_by") == "created_at desc")
            return 200, {"pipeline_versions": versions[: int(query.get("page_size", 10))], "total_size": len(versions)}
        if op_id == "ExperimentService_ListExperiments":
            return 200, {"experiments": self.filtered(list(self.experiments.values()), query)}
        if op_id == "ExperimentService_CreateExperiment":
            eid = next(self.ids)
            self.experiments[eid] = {**body, "experiment_id": eid, "created_at": now, "storage_state": "AVAILABLE"}
            return 200, self.experiments[eid]
        if op_id == "RunService_CreateRun":
            rid = next(self.ids)
            self.runs[rid] = {**body, "run_id": rid, "state": "PENDING", "created_at": now}
            return 200, self.runs[rid]
        if op_id == "RecurringRunService_ListRecurringRuns":
            runs = [r for r in self.recurring.values()
                    if "experiment_id" not in query or r["experiment_id"] == query["experiment_id"]]
            return 200, {"recurringRuns": self.filtered(runs, query), "total_size": len(runs)}
        if op_id == "RecurringRunService_CreateRecurringRun":
            rid = next(self.ids)
            self.recurring[rid] = {**body, "recurring_run_id": rid, "status": "ENABLED", "created_at": now}
            return 200, self.recurring[rid]
        if op_id == "RecurringRunService_DeleteRecurringRun":
            self.recurring.pop(path["recurring_run_id"])
            return 200, {}
        if op_id == "RecurringRunService_DisableRecurringRun":
            self.recurring[path["recurring_run_id"]].update(mode="DISABLE", status="DISABLED")
            return 200, {}
        self.errors.append(f"unhandled {op_id}")
        return 501, {"code": 12, "message": "unimplemented in the test server"}


@pytest.fixture
def kfp_server(shared_dir: Path, tmp_path: Path, monkeypatch) -> Iterator[tuple[FakeKFP, str]]:
    spec = json.loads((shared_dir / "schemas/kfp-api/kfp_api_single_file.swagger.json").read_text())
    fake = FakeKFP(spec)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            fake.handle(self)

        do_POST = do_DELETE = do_GET

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("HOME", str(tmp_path))  # kfp.Client keeps a context file under ~/.config/kfp
    monkeypatch.setenv("NEMOFORGE_KFP_TOKEN", TOKEN)
    monkeypatch.setenv("KF_PIPELINES_SA_TOKEN_PATH", str(tmp_path / "no-sa-token"))
    try:
        yield fake, f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


def test_submit_uploads_then_runs_the_new_version(kfp_server, capsys):
    fake, host = kfp_server
    assert main(["submit", "llama-3.1-8b", "--host", host, "--experiment", "nemotron", *CLUSTER_SETS]) == 0
    assert main(["submit", "llama-3.1-8b", "--host", host, "--experiment", "nemotron", *CLUSTER_SETS]) == 0
    out = capsys.readouterr()
    assert fake.errors == []
    assert set(fake.auth) == {f"Bearer {TOKEN}"} and TOKEN not in out.out + out.err
    (pipeline,) = fake.pipelines.values()
    assert pipeline["display_name"] == "nemoforge-llama-3.1-8b"
    assert len(fake.versions) == 2 and len(fake.experiments) == 1 and len(fake.runs) == 2
    ops = [(m, p) for m, p, _, _ in fake.calls]
    assert ops.count(("POST", "/apis/v2beta1/pipelines/upload")) == 1
    assert ops.count(("POST", "/apis/v2beta1/pipelines/upload_version")) == 1
    newest = max(fake.versions.values(), key=lambda v: v["created_at"])
    run = list(fake.runs.values())[-1]
    assert run["pipeline_version_reference"] == {"pipeline_id": pipeline["pipeline_id"],
                                                 "pipeline_version_id": newest["pipeline_version_id"]}
    assert "pipeline_spec" not in run and run["service_account"] == "nemoforge"
    assert run["experiment_id"] == next(iter(fake.experiments))
    assert run["display_name"].startswith("llama-3.1-8b-")
    # the uploaded package is the compiled recipe with the overrides baked into its recipe_json default
    ir = newest["pipeline_spec"]
    recipe_json = json.loads(ir["root"]["inputDefinitions"]["parameters"]["recipe_json"]["defaultValue"])
    assert recipe_json["storage"]["artifact_root"] == "s3://team-bucket/nemoforge"
    assert f"run {run['display_name']} ({run['run_id']}) started in experiment nemotron" in out.out


def test_schedule_is_idempotent_like_the_chart_runs_it(kfp_server, capsys):
    """The exact argument form of charts/nemoforge/templates/schedule-job.yaml, run twice (install, upgrade)."""
    fake, host = kfp_server
    args = ["schedule", "llama-3.3-70b-super", "--cron", "0 0 3 * * 0", "--experiment", "retraining",
            "--host", host, "--namespace", "team-a", *CLUSTER_SETS, "--set", "storage.s3_region=eu-west-1"]
    assert main(args) == 0
    first = next(iter(fake.recurring))
    assert main(args) == 0
    assert fake.errors == []
    (job,) = fake.recurring.values()  # the first one was deleted, exactly one remains
    assert job["recurring_run_id"] != first
    assert ("DELETE", f"/apis/v2beta1/recurringruns/{first}") in [(m, p) for m, p, _, _ in fake.calls]
    newest = max(fake.versions.values(), key=lambda v: v["created_at"])
    assert job["pipeline_version_reference"]["pipeline_version_id"] == newest["pipeline_version_id"]
    assert job["trigger"] == {"cron_schedule": {"cron": "0 0 3 * * 0"}}
    assert int(job["max_concurrency"]) == 1 and job["no_catchup"] is True and job["mode"] == "ENABLE"
    assert job["display_name"] == "nemoforge-llama-3.3-70b-super" and job["service_account"] == "nemoforge"
    (experiment,) = fake.experiments.values()
    assert experiment["display_name"] == "retraining" and experiment["namespace"] == "team-a"
    (upload,) = [q for m, p, q, _ in fake.calls if p == "/apis/v2beta1/pipelines/upload"]
    assert upload["namespace"] == "team-a"
    out = capsys.readouterr().out
    assert "cron '0 0 3 * * 0' in experiment retraining, replacing 1" in out


def test_schedule_list_and_disable(kfp_server, capsys):
    fake, host = kfp_server
    assert main(["schedule", "llama-3.1-8b", "--cron", "0 30 2 * * *", "--host", host, *CLUSTER_SETS]) == 0
    capsys.readouterr()
    assert main(["schedule", "--list", "--host", host]) == 0
    (line,) = capsys.readouterr().out.strip().splitlines()
    (rid,) = fake.recurring
    assert line.split("\t")[:4] == ["nemoforge-llama-3.1-8b", "0 30 2 * * *", "ENABLE", "ENABLED"]
    assert line.endswith(rid)
    assert main(["schedule", "--disable", "nemoforge-llama-3.1-8b", "--host", host, "--experiment", "nemoforge"]) == 0
    assert fake.recurring[rid]["mode"] == "DISABLE"
    assert ("POST", f"/apis/v2beta1/recurringruns/{rid}:disable") in [(m, p) for m, p, _, _ in fake.calls]
    assert main(["schedule", "--disable", "no-such", "--host", host]) == 2
    assert "no recurring run named 'no-such'" in capsys.readouterr().err
    assert fake.errors == []


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["schedule", "llama-3.1-8b", "--cron", "0 3 * * 0"], 'has 5 fields; KFP wants 6, seconds first (with seconds: "0 0 3 * * 0")'),
        (["schedule", "llama-3.1-8b"], "needs --cron"),
        (["schedule", "llama-3.1-8b", "--list"], "one of: RECIPE --cron CRON, --list, --disable NAME"),
        (["submit", "smollm2-135m-demo"], "use --set storage.artifact_root=s3://BUCKET/PREFIX"),
        (["submit", "llama-3.1-8b", "--set", "tracking.mlflow_uri=sqlite:///x.db"], "use --set tracking.mlflow_uri=http"),
    ],
)
def test_mistakes_fail_before_any_request(kfp_server, capsys, argv, message):
    fake, host = kfp_server
    assert main([*argv, "--host", host]) == 2
    assert message in capsys.readouterr().err
    assert fake.calls == []


def test_the_fake_server_rejects_what_the_real_spec_rejects(kfp_server):
    fake, _ = kfp_server
    good = {"display_name": "x", "trigger": {"cron_schedule": {"cron": "0 0 3 * * 0"}}, "max_concurrency": "1",
            "mode": "ENABLE", "no_catchup": True}
    fake.check("ok", "#/definitions/v2beta1RecurringRun", good)
    assert fake.errors == []
    bad = copy.deepcopy(good) | {"maxConcurrency": 1, "mode": "ON"}
    fake.check("bad", "#/definitions/v2beta1RecurringRun", bad)
    assert any("maxConcurrency" in e for e in fake.errors) and any("'ON'" in e for e in fake.errors)


def test_force_reaches_the_run_and_the_schedule_as_the_pipeline_parameter(kfp_server, capsys):
    fake, host = kfp_server
    assert main(["submit", "llama-3.1-8b", "--host", host, "--force", *CLUSTER_SETS]) == 0
    assert main(["submit", "llama-3.1-8b", "--host", host, *CLUSTER_SETS]) == 0
    assert main(["schedule", "llama-3.1-8b", "--cron", "0 0 3 * * 0", "--host", host, "--force", *CLUSTER_SETS]) == 0
    assert fake.errors == []
    forced, plain = fake.runs.values()
    assert forced["runtime_config"]["parameters"] == {"force": True}
    assert "force" not in (plain.get("runtime_config") or {}).get("parameters", {})  # the compiled default: false
    (job,) = fake.recurring.values()
    assert job["runtime_config"]["parameters"] == {"force": True}
    ir = max(fake.versions.values(), key=lambda v: v["created_at"])["pipeline_spec"]
    assert ir["root"]["inputDefinitions"]["parameters"]["force"]["defaultValue"] is False
