"""Bad input to ``nemoforge run``: exit code 2, one line naming the field or flag, nothing written, in seconds.

The rows are the table "Bad input" in docs/operating.md; keep the two in step.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nemoforge_cli.main import main

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _this_checkout() -> dict[str, str]:
    """The environment for a `python -m nemoforge_cli` subprocess that imports what this test imports."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}


def _tiny_parent(tiny: Path) -> list[str]:
    return ["--set", "model.parent.source=hf-dir", "--set", f"model.parent.path={tiny}"]


DEMO = "smollm2-135m-demo"

# (id, [RECIPE, *args] of `run RECIPE --workdir W *args`, as a function of (tmp_path, tiny parent dir), first line, max seconds)
ROWS = [
    ("corpus-not-utf8",
     lambda t, _: [DEMO, "--set", f"data.corpus_uri={t / 'latin1.txt'}"],
     "{t}/latin1.txt is not UTF-8 text (it holds byte 0xe9): convert it (iconv -t UTF-8) or fix data.corpus_uri", 10),
    ("corpus-jsonl-without-text-field",
     lambda t, _: [DEMO, "--set", f"data.corpus_uri={t / 'rows.jsonl'}"],
     "{t}/rows.jsonl:1 has no field 'text' (it has ['body']): set data.text_field", 10),
    ("corpus-jsonl-text-not-a-string",
     lambda t, _: [DEMO, "--set", f"data.corpus_uri={t / 'numbers.jsonl'}"],
     "{t}/numbers.jsonl:2 field 'text' is int 1, not a string: give each row's text as a JSON string", 10),
    ("corpus-empty",
     lambda t, _: [DEMO, "--set", f"data.corpus_uri={t / 'empty.txt'}"],
     "data.corpus_uri {t}/empty.txt holds no text: give a non-empty .txt/.jsonl corpus", 10),
    ("recipe-not-yaml",
     lambda t, _: [str(t / "broken.yaml")],
     "recipe {t}/broken.yaml is not valid YAML: expected the node content, but found '<stream end>' "
     "(line 3, column 1)", 10),
    ("s3-endpoint-not-a-url",
     lambda t, _: [DEMO, "--set", "storage.artifact_root=s3://b/runs", "--set", "storage.s3_endpoint_url=not-a-url"],
     f"invalid recipe {DEMO}: storage.s3_endpoint_url: 'not-a-url' is not an S3 endpoint URL: "
     "give http(s)://host[:port], e.g. http://127.0.0.1:9000", 10),
    ("s3-endpoint-refuses-without-credentials",
     lambda t, _: [DEMO, "--set", "storage.artifact_root=s3://b/runs", "--set", "storage.s3_endpoint_url=http://127.0.0.1:{port}"],
     "cannot reach S3 endpoint http://127.0.0.1:{port} for s3://b/runs (EndpointConnectionError): "
     "start the S3/MinIO server or fix storage.s3_endpoint_url", 15),
    ("workdir-is-a-file",
     lambda t, _: [DEMO],
     "--workdir {w}: {w} is a file, not a directory: give a directory", 10),
    ("unknown-set-key",
     lambda t, _: [DEMO, "--set", "distill.stepz=3"],
     f"invalid recipe {DEMO}: distill.stepz: unknown key; remove it or fix its spelling "
     "(see `nemoforge run --help` for sections)", 10),
    ("fusion-kl-budget-below-zero",
     lambda t, _: [DEMO, "--set", "nas.ffn_fusion.kl_budget=-0.1"],
     f"invalid recipe {DEMO}: nas.ffn_fusion.kl_budget: Input should be greater than or equal to 0", 10),
    ("fusion-in-search-without-fusion",
     lambda t, _: [DEMO, "--set", "nas.ffn_fusion.in_search=true"],
     f"invalid recipe {DEMO}: nas.ffn_fusion: in_search needs nas.ffn_fusion.enabled=true: the search would "
     "count a saving no fusion makes", 10),
    ("impossible-memory-budget",
     lambda t, tiny: [DEMO, *_tiny_parent(tiny), "--set", "nas.memory_budget_gib=0.0001"],
     "nas.memory_budget_gib=0.0001 is below what any child needs", 10),
    ("reasoning-parser-unknown",
     lambda t, tiny: [DEMO, *_tiny_parent(tiny), "--set", "serve.enabled=true", "--set", "serve.reasoning_parser=nope"],
     "serve.reasoning_parser='nope' is not a vLLM reasoning parser: use one of", 60),
    ("reasoning-parser-cannot-start",
     lambda t, tiny: [DEMO, *_tiny_parent(tiny), "--set", "serve.enabled=true", "--set", "serve.reasoning_parser=deepseek_r1"],
     "serve.reasoning_parser='deepseek_r1' cannot start for this model (RuntimeError: ", 60),
]  # fmt: skip


@pytest.mark.parametrize(("argv_of", "first_line", "max_s"), [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])
def test_bad_input_is_one_line(argv_of, first_line, max_s, tmp_path: Path, tiny_llama_dir: Path, capsys, monkeypatch):
    (tmp_path / "latin1.txt").write_bytes("café au lait\n".encode("latin-1"))
    (tmp_path / "rows.jsonl").write_text('{"body": "no text field here"}\n')
    (tmp_path / "numbers.jsonl").write_text('{"text": "a row of text"}\n{"text": 1}\n')
    (tmp_path / "empty.txt").write_text("\n\n")
    (tmp_path / "broken.yaml").write_text("name: x\nmodel: [\n")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("NEMOFORGE_CACHE", str(tmp_path / "cache"))
    workdir = tmp_path / "w"
    if "{w}" in first_line:
        workdir.write_text("")
    port = _free_port()
    argv = [a.format(port=port) for a in argv_of(tmp_path, tiny_llama_dir)]

    started = time.monotonic()
    rc = main(["run", argv[0], "--workdir", str(workdir), *argv[1:]])
    elapsed_s = time.monotonic() - started

    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith("nemoforge: error: " + first_line.format(t=tmp_path, w=workdir, port=port)), err[0]
    assert elapsed_s < max_s
    assert not (workdir / "artifacts").exists() and not (workdir / "mlflow.db").exists()
    if workdir.is_dir():
        assert sorted(p.name for p in workdir.iterdir() if p.name != "cache") == []


def test_read_only_workdir_with_artifact_root_elsewhere(tmp_path: Path) -> None:
    """A read-only workdir names --workdir (not an OSError on last-error.txt). As root, chmod does not stop
    writes, so the directory is bind-mounted read-only in a private mount namespace (unshare -m)."""
    workdir = tmp_path / "ro"
    workdir.mkdir()
    cmd = [sys.executable, "-m", "nemoforge_cli", "run", "smollm2-135m-demo", "--workdir", str(workdir),
           "--set", f"storage.artifact_root={tmp_path / 'artifacts'}"]  # fmt: skip
    if os.geteuid() == 0:
        if shutil.which("unshare") is None:
            pytest.skip("running as root without unshare: no way to make a directory read-only")
        script = 'mount --bind -o ro "$0" "$0" && exec "$@"'
        cmd = ["unshare", "-m", "sh", "-c", script, str(workdir), *cmd]
    else:
        workdir.chmod(0o555)
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'src'}:{REPO}"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    workdir.chmod(0o755)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1, proc.stderr
    assert err[0] == f"nemoforge: error: --workdir {workdir}: {workdir} is not writable: give a writable directory"
    assert not (tmp_path / "artifacts").exists()


def test_serve_refuses_a_reasoning_parser_the_model_cannot_start(tiny_llama_dir: Path, tmp_path: Path, capsys):
    rc = main(["serve", str(tiny_llama_dir), "--workdir", str(tmp_path), "--set", "serve.reasoning_parser=deepseek_r1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith("nemoforge: error: serve.reasoning_parser='deepseek_r1' cannot start for this model")
    assert not (tmp_path / "serve").exists()  # refused before vLLM was started


def test_serve_refuses_a_checkpoint_whose_ffn_widths_disagree(tiny_llama_dir: Path, tmp_path: Path, capsys):
    """A nemotron-nas block giving both ``ffn_mult`` and a disagreeing ``intermediate_size``: one line naming the
    config file and the layer, before vLLM starts (issue 14, bad input)."""
    import json

    from transformers import AutoTokenizer

    from nemoforge.models.convert import load_causal_lm
    from nemoforge.models.export import export_checkpoint

    out = export_checkpoint(
        load_causal_lm(tiny_llama_dir), AutoTokenizer.from_pretrained(tiny_llama_dir), tmp_path / "child"
    )
    config = json.loads((out / "config.json").read_text())
    config["block_configs"][1]["ffn"]["intermediate_size"] = 512  # ffn_mult 18.0 gives 768 at hidden 64
    (out / "config.json").write_text(json.dumps(config))
    capsys.readouterr()  # the export's progress bars
    rc = main(["serve", str(out), "--workdir", str(tmp_path / "w")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert err[0] == (
        f"nemoforge: error: {out / 'config.json'}: DeciLMConfig: layer 1 ffn gives ffn_mult=18.0 (intermediate size "
        "768 at hidden size 64) and intermediate_size=512, which disagree: give one of them"
    )
    assert not (tmp_path / "w" / "serve").exists()  # refused before vLLM was started


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_compile_to_a_path_it_cannot_write(tmp_path: Path, capsys):
    (tmp_path / "afile").write_text("")
    assert main(["compile", DEMO, "-o", str(tmp_path / "afile" / "p.yaml")]) == 2
    assert _one_line(capsys) == (
        f"nemoforge: error: -o {tmp_path}/afile/p.yaml: cannot write it (File exists: {tmp_path}/afile): "
        "give a writable path"
    )


def test_compile_into_a_read_only_directory(tmp_path: Path):
    """As root, chmod does not stop writes: the directory is bind-mounted read-only (as the workdir test does)."""
    ro = tmp_path / "ro"
    ro.mkdir()
    cmd = [sys.executable, "-m", "nemoforge_cli", "compile", DEMO, "-o", str(ro / "p.yaml")]
    if os.geteuid() == 0:
        if shutil.which("unshare") is None:
            pytest.skip("running as root without unshare: no way to make a directory read-only")
        cmd = ["unshare", "-m", "sh", "-c", 'mount --bind -o ro "$0" "$0" && exec "$@"', str(ro), *cmd]
    else:
        ro.chmod(0o555)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_this_checkout(), timeout=120)
    ro.chmod(0o755)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1, proc.stderr
    assert err[0].startswith(f"nemoforge: error: -o {ro}/p.yaml: cannot write it (") and "give a writable path" in err[0]


def test_serve_port_out_of_range(tiny_llama_dir: Path, tmp_path: Path, capsys):
    assert main(["serve", str(tiny_llama_dir), "--workdir", str(tmp_path), "--port", "99999"]) == 2
    assert _one_line(capsys) == "nemoforge: error: port 99999 is not a TCP port: pass --port 1-65535"


def test_serve_a_directory_without_a_model(tmp_path: Path, capsys):
    """Named as such, not as a tokenizer error from the reasoning-parser check."""
    (tmp_path / "empty").mkdir()
    assert main(["serve", str(tmp_path / "empty"), "--workdir", str(tmp_path / "w")]) == 2
    assert _one_line(capsys) == (
        f"nemoforge: error: {tmp_path}/empty holds no model (no config.json): give a checkpoint directory (a "
        "stage's model output), a store URI or models:/NAME@ALIAS"
    )


def test_status_workdir_is_a_file(tmp_path: Path, capsys):
    (tmp_path / "afile").write_text("")
    assert main(["status", "--workdir", str(tmp_path / "afile")]) == 2
    assert _one_line(capsys) == (
        f"nemoforge: error: --workdir {tmp_path}/afile: {tmp_path}/afile is a file, not a directory: give a run's "
        "workdir"
    )


def test_status_into_a_closed_pipe_exits_quietly(tmp_path: Path):
    """`nemoforge status --json | head -1`: no BrokenPipeError traceback; exit 141 (128 + SIGPIPE) as Unix tools."""
    from mlflow import MlflowClient

    MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").create_experiment("nemoforge")  # an empty registry
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first line, as head is after its lines
    cmd = [sys.executable, "-m", "nemoforge_cli", "status", "--workdir", str(tmp_path), "--json"]
    proc = subprocess.run(cmd, stdout=write_end, stderr=subprocess.PIPE, text=True, env=_this_checkout(), timeout=120)
    os.close(write_end)
    assert proc.stderr == "" and proc.returncode == 141
