"""Remote code verified before it is trusted (issue 16 §2): a tampered ``modeling_decilm.py`` is refused by
every load path (transformers load, `nemoforge serve`, the serve stage, vLLM greedy parity, GRPO's vLLM
rollouts, the manifests' init container) before any of them runs it."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from nemoforge.errors import NemoforgeError
from nemoforge.models.remote_code import SHIPPED_DIR, verify_remote_code

SHIPPED_SHA = hashlib.sha256((SHIPPED_DIR / "modeling_decilm.py").read_bytes()).hexdigest()


def tamper(model_dir: Path) -> str:
    """Replace one line of the export's modeling_decilm.py; returns the file's new sha256."""
    file = model_dir / "modeling_decilm.py"
    lines = file.read_text().splitlines(keepends=True)
    i = next(i for i, line in enumerate(lines) if line.startswith("import torch"))
    lines[i] = "import torch; open('/tmp/nemoforge-pwned', 'w')\n"
    file.write_text("".join(lines))
    return hashlib.sha256(file.read_bytes()).hexdigest()


def refusal(got_sha: str) -> str:
    """The one-line refusal: the file and both digests."""
    return (
        rf"refusing to trust remote code: \S+/modeling_decilm\.py has sha256 {got_sha}, .* has {SHIPPED_SHA};"
    )


@pytest.fixture(scope="module")
def export_dir(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untouched nemotron-nas export of the tiny Llama (all-parent)."""
    from transformers import AutoTokenizer

    from nemoforge.models.convert import load_causal_lm
    from nemoforge.models.export import export_checkpoint

    out = tmp_path_factory.mktemp("export") / "model"
    return export_checkpoint(
        load_causal_lm(tiny_llama_dir), AutoTokenizer.from_pretrained(tiny_llama_dir), out
    )


@pytest.fixture
def tampered(export_dir: Path, tmp_path: Path) -> tuple[Path, str]:
    import shutil

    model_dir = Path(shutil.copytree(export_dir, tmp_path / "model"))
    return model_dir, tamper(model_dir)


def test_an_untouched_export_and_a_plain_llama_verify(export_dir: Path, tiny_llama_dir: Path):
    verify_remote_code(export_dir)
    verify_remote_code(tiny_llama_dir)  # no Python files, no auto_map


def test_transformers_load_refuses(tampered):
    from nemoforge.models.convert import load_causal_lm

    model_dir, sha = tampered
    with pytest.raises(NemoforgeError, match=refusal(sha)) as err:
        load_causal_lm(model_dir)
    assert "\n" not in str(err.value)


def test_vllm_server_start_refuses_before_starting(tampered, tmp_path: Path):
    """`nemoforge serve` and the serve stage both start vLLM through VLLMServer.start."""
    from nemoforge.serving.server import VLLMServer, free_port

    model_dir, sha = tampered
    server = VLLMServer(model_dir, port=free_port(), served_model_name="m", log_path=tmp_path / "log")
    with pytest.raises(NemoforgeError, match=refusal(sha)):
        server.start()
    assert server.process is None and not (tmp_path / "log").exists()


def test_serve_stage_refuses(tampered, tmp_path: Path):
    from nemoforge.artifacts import open_store
    from nemoforge.config import load_recipe
    from nemoforge.stages.serve import run

    model_dir, sha = tampered
    store = open_store(str(tmp_path / "artifacts"))
    recipe = load_recipe("smollm2-135m-demo", ["serve.enabled=true"])
    with pytest.raises(NemoforgeError, match=refusal(sha)):
        run(recipe, model_uri=str(model_dir), output_uri=store.join("run", "serve"), store=store)


def test_cli_serve_refuses_in_one_line(tampered, tmp_path: Path, capsys):
    from nemoforge_cli.main import main

    model_dir, sha = tampered
    assert main(["serve", str(model_dir), "--workdir", str(tmp_path)]) == 2
    (error,) = capsys.readouterr().err.strip().splitlines()  # the refusal only: vLLM never announced
    assert error.startswith("nemoforge: error: ") and re.search(refusal(sha), error), error
    assert not (tmp_path / "serve").exists()


def test_vllm_greedy_refuses_before_the_child_starts(tampered, monkeypatch):
    from nemoforge.serving import greedy

    model_dir, sha = tampered
    monkeypatch.setattr(greedy.subprocess, "run", lambda *a, **k: pytest.fail("vLLM child started"))
    with pytest.raises(NemoforgeError, match=refusal(sha)):
        greedy.vllm_greedy(model_dir, [[1, 2]], 2)


def test_rollout_engine_refuses_before_vllm_starts(tiny_llama_dir: Path, monkeypatch):
    """The rollout engine exports the policy and verifies the export; a tampered export never reaches vLLM."""
    from transformers import AutoTokenizer

    from nemoforge.models import export
    from nemoforge.models.convert import load_causal_lm
    from nemoforge.stages.rl.rollout import VLLMRollouts

    real_export, written = export.export_checkpoint, {}

    def export_then_tamper(model, tokenizer, out_dir):
        written["dir"] = real_export(model, tokenizer, out_dir)
        written["sha"] = tamper(written["dir"])
        return written["dir"]

    monkeypatch.setattr(export, "export_checkpoint", export_then_tamper)
    monkeypatch.setitem(
        sys.modules, "vllm", None
    )  # importing vLLM would fail the test: it must not get there
    model = load_causal_lm(tiny_llama_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    with pytest.raises(NemoforgeError, match=r"refusing to trust remote code") as err:
        VLLMRollouts(model, tokenizer, max_model_len=64)
    assert re.search(refusal(written["sha"]), str(err.value))
    assert not written["dir"].exists()  # the engine's temp dir is removed


def test_init_container_command_refuses(tampered, export_dir: Path):
    """`python -m nemoforge.models.remote_code /mnt/models`, the manifests' verify-remote-code init container."""
    model_dir, sha = tampered
    cmd = [sys.executable, "-m", "nemoforge.models.remote_code"]
    bad = subprocess.run([*cmd, str(model_dir)], capture_output=True, text=True, env=_env())
    assert bad.returncode == 1 and bad.stdout == ""
    assert len(bad.stderr.strip().splitlines()) == 1 and bad.stderr.startswith("nemoforge: error: ")
    assert re.search(refusal(sha), bad.stderr), bad.stderr
    good = subprocess.run([*cmd, str(export_dir)], capture_output=True, text=True, env=_env())
    assert good.returncode == 0, good.stderr


def test_code_nemoforge_does_not_ship_is_refused(export_dir: Path, tmp_path: Path):
    import shutil

    extra = Path(shutil.copytree(export_dir, tmp_path / "extra"))
    (extra / "tokenization_evil.py").write_text("print('hi')\n")
    with pytest.raises(
        NemoforgeError, match=r"tokenization_evil\.py \(sha256 [0-9a-f]{64}\) is not a module"
    ):
        verify_remote_code(extra)

    hub = Path(shutil.copytree(export_dir, tmp_path / "hub"))
    config = json.loads((hub / "config.json").read_text())
    config["auto_map"]["AutoModelForCausalLM"] = "someone/repo--modeling_decilm.DeciLMForCausalLM"
    (hub / "config.json").write_text(json.dumps(config))
    with pytest.raises(NemoforgeError, match=r"maps AutoModelForCausalLM to 'someone/repo--modeling_decilm"):
        verify_remote_code(hub)


def _env() -> dict[str, str]:
    import os

    return {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
