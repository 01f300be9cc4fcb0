"""Serving without vLLM: the reasoning split, the streaming client, process-group stop, bad input."""

from __future__ import annotations

import json
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from nemoforge.artifacts import open_store
from nemoforge.config import load_recipe
from nemoforge.errors import InputNotFoundError
from nemoforge.serving.client import chat, split_reasoning
from nemoforge.serving.server import ServeError, VLLMServer, free_port, server_command


def group_members(pgid: int) -> list[str]:
    """Live (non-zombie) processes of group ``pgid`` as 'pid state'."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            pid, rest = stat.read_text().split(" (", 1)
            fields = rest.rsplit(")", 1)[1].split()
        except (OSError, ValueError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            alive.append(f"{pid} {fields[0]}")
    return alive


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("<think>7+12 is 19.</think>19", ("7+12 is 19.", "19")),
        ("<think>\n\n</think>\n\n19", ("", "19")),
        ("adding them: 19.</think> 19", ("adding them: 19.", "19")),
        ("<think>still thinking", ("still thinking", "")),
        ("19", ("", "19")),
    ],
)
def test_split_reasoning(text, expected):
    assert split_reasoning(text) == expected


def test_server_command_is_the_python_module_with_remote_code(tmp_path):
    cmd = server_command(tmp_path, port=8123, served_model_name="child", reasoning_parser="deepseek_r1")
    assert cmd[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert "--trust-remote-code" in cmd and "--enforce-eager" in cmd
    assert (
        cmd[cmd.index("--port") + 1] == "8123" and cmd[cmd.index("--reasoning-parser") + 1] == "deepseek_r1"
    )


class _FakeOpenAI(BaseHTTPRequestHandler):
    """Streams '<think>12 + 7 = 19</think>19' in three chunks, then usage, like vLLM without a parser."""

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        assert body["stream"] and body["messages"][0] == {"role": "system", "content": "detailed thinking on"}
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        for piece in ["<think>12 + 7", " = 19</think>", "19"]:
            time.sleep(0.05)
            chunk = {"choices": [{"index": 0, "delta": {"content": piece}}]}
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            self.wfile.flush()
        self.wfile.write(
            f"data: {json.dumps({'choices': [], 'usage': {'completion_tokens': 9}})}\n\n".encode()
        )
        self.wfile.write(b"data: [DONE]\n\n")

    def log_message(self, *args):
        pass


def test_chat_streams_splits_reasoning_and_times_it():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _FakeOpenAI)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        result = chat(
            f"http://127.0.0.1:{httpd.server_port}",
            "m",
            "What is 12 + 7?",
            system_prompt="detailed thinking on",
        )
    finally:
        httpd.shutdown()
    assert (result.reasoning, result.answer, result.output_tokens) == ("12 + 7 = 19", "19", 9)
    assert 0.03 < result.ttft_s < result.total_s
    assert 8 / 0.3 < result.output_tokens_per_s < 8 / 0.05


def _fake_model(tmp_path: Path) -> Path:
    (tmp_path / "config.json").write_text("{}")
    return tmp_path


def test_stop_kills_the_whole_process_group(tmp_path, monkeypatch):
    """A server whose main process has a child that ignores SIGTERM: nothing survives stop()."""
    monkeypatch.setattr("nemoforge.serving.server.vllm_version", lambda: "fake")
    server = VLLMServer(
        _fake_model(tmp_path), port=free_port(), served_model_name="m", log_path=tmp_path / "log"
    )
    stubborn = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"
    server.command = [
        sys.executable,
        "-c",
        f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {stubborn!r}]); time.sleep(600)",
    ]
    server.start()
    pgid = server.process.pid
    deadline = time.monotonic() + 20
    while len(group_members(pgid)) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(group_members(pgid)) == 2
    server.stop(grace_s=1)
    assert group_members(pgid) == []


def test_a_server_that_exits_while_loading_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr("nemoforge.serving.server.vllm_version", lambda: "fake")
    server = VLLMServer(
        _fake_model(tmp_path), port=free_port(), served_model_name="m", log_path=tmp_path / "log"
    )
    server.command = [
        sys.executable,
        "-c",
        "import sys; print('ValueError: cannot load this model'); sys.exit(3)",
    ]
    with pytest.raises(
        ServeError, match=r"vLLM exited with code 3 while loading .*: ValueError: cannot load this model"
    ):
        with server:
            pass
    assert server.process is None


def test_a_port_in_use_is_refused_before_starting(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        server = VLLMServer(
            _fake_model(tmp_path), port=port, served_model_name="m", log_path=tmp_path / "log"
        )
        with pytest.raises(ServeError, match=f"port {port} on 127.0.0.1 is in use"):
            server.start()
    assert server.process is None


def test_serve_stage_names_a_missing_model(tmp_path):
    from nemoforge.stages.serve import run

    store = open_store(str(tmp_path / "artifacts"))
    recipe = load_recipe("smollm2-135m-demo", ["serve.enabled=true"])
    with pytest.raises(InputNotFoundError, match="does-not-exist"):
        run(
            recipe, model_uri=store.join("does-not-exist"), output_uri=store.join("run", "serve"), store=store
        )


def test_cli_serve_names_a_missing_directory(tmp_path, capsys):
    from nemoforge_cli.main import main

    assert main(["serve", str(tmp_path / "nope"), "--workdir", str(tmp_path)]) == 2
    assert "nope" in capsys.readouterr().err


def test_the_pipeline_ends_with_a_serve_task_on_the_serve_resources(tmp_path):
    import yaml

    from nemoforge_pipelines import compile_recipe

    recipe = load_recipe(
        "smollm2-135m-demo",
        ["serve.enabled=true", "resources.serve.gpu_count=1", "resources.serve.node_selector={pool: gpu}"],
    )
    spec, platform = yaml.safe_load_all(compile_recipe(recipe, tmp_path / "p.yaml").read_text())
    dag: dict = {}  # every task of the nested DAGs (root, exit handler, the check-inputs condition) by name
    pending = [spec["root"]["dag"]["tasks"]]
    while pending:
        for name, task in pending.pop().items():
            dag[name] = task
            if "dag" in spec["components"][task["componentRef"]["name"]]:
                pending.append(spec["components"][task["componentRef"]["name"]]["dag"]["tasks"])
    last_model_stage = [s for s in recipe.enabled_stages() if s not in ("eval", "serve")][-1]
    assert (
        dag["serve"]["inputs"]["artifacts"]["input_model"]["taskOutputArtifact"]["producerTask"]
        == last_model_stage
    )
    executor = spec["deploymentSpec"]["executors"]["exec-serve"]["container"]
    assert executor["resources"]["accelerator"]["resourceCount"] == "1"
    assert platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-serve"][
        "nodeSelector"
    ] == {"labels": {"pool": "gpu"}}
