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

from nemoforge.cli import main

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tiny_parent(tiny: Path) -> list[str]:
    return ["--set", "model.parent.source=hf-dir", "--set", f"model.parent.path={tiny}"]


# (id, argv after `run RECIPE --workdir W`, as a function of (tmp_path, tiny parent dir), first line, max seconds)
ROWS = [
    ("corpus-not-utf8",
     lambda t, _: ["--set", f"data.corpus_uri={t / 'latin1.txt'}"],
     "{t}/latin1.txt is not UTF-8 text (it holds byte 0xe9): convert it (iconv -t UTF-8) or fix data.corpus_uri", 10),
    ("corpus-jsonl-without-text-field",
     lambda t, _: ["--set", f"data.corpus_uri={t / 'rows.jsonl'}"],
     "{t}/rows.jsonl:1 has no field 'text' (it has ['body']): set data.text_field", 10),
    ("s3-endpoint-not-a-url",
     lambda t, _: ["--set", "storage.artifact_root=s3://b/runs", "--set", "storage.s3_endpoint_url=not-a-url"],
     "invalid recipe smollm2-135m-demo: storage.s3_endpoint_url: 'not-a-url' is not an S3 endpoint URL: "
     "give http(s)://host[:port], e.g. http://127.0.0.1:9000", 10),
    ("s3-endpoint-refuses-without-credentials",
     lambda t, _: ["--set", "storage.artifact_root=s3://b/runs", "--set", "storage.s3_endpoint_url=http://127.0.0.1:{port}"],
     "cannot reach S3 endpoint http://127.0.0.1:{port} for s3://b/runs (EndpointConnectionError): "
     "start the S3/MinIO server or fix storage.s3_endpoint_url", 15),
    ("workdir-is-a-file",
     lambda t, _: [],
     "--workdir {w}: {w} is a file, not a directory: give a directory", 10),
    ("unknown-set-key",
     lambda t, _: ["--set", "distill.stepz=3"],
     "invalid recipe smollm2-135m-demo: distill.stepz: unknown key; remove it or fix its spelling "
     "(see `nemoforge run --help` for sections)", 10),
    ("impossible-memory-budget",
     lambda t, tiny: [*_tiny_parent(tiny), "--set", "nas.memory_budget_gib=0.0001"],
     "nas.memory_budget_gib=0.0001 is below what any child needs", 10),
    ("reasoning-parser-unknown",
     lambda t, tiny: [*_tiny_parent(tiny), "--set", "serve.enabled=true", "--set", "serve.reasoning_parser=nope"],
     "serve.reasoning_parser='nope' is not a vLLM reasoning parser: use one of", 60),
    ("reasoning-parser-cannot-start",
     lambda t, tiny: [*_tiny_parent(tiny), "--set", "serve.enabled=true", "--set", "serve.reasoning_parser=deepseek_r1"],
     "serve.reasoning_parser='deepseek_r1' cannot start for this model (RuntimeError: ", 60),
]  # fmt: skip


@pytest.mark.parametrize(("argv_of", "first_line", "max_s"), [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])
def test_bad_input_is_one_line(argv_of, first_line, max_s, tmp_path: Path, tiny_llama_dir: Path, capsys, monkeypatch):
    (tmp_path / "latin1.txt").write_bytes("café au lait\n".encode("latin-1"))
    (tmp_path / "rows.jsonl").write_text('{"body": "no text field here"}\n')
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
    rc = main(["run", "smollm2-135m-demo", "--workdir", str(workdir), *argv])
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
    cmd = [sys.executable, "-m", "nemoforge.cli", "run", "smollm2-135m-demo", "--workdir", str(workdir),
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
