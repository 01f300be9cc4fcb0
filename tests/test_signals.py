"""Issue 15 §1: SIGTERM and SIGINT stop a real `nemoforge run` with its whole process tree, and MLflow and
`nemoforge status` say that the stage and the pipeline run were KILLED; runs whose command died without a word
(SIGKILL, a crash) are ended by the next `nemoforge run`."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import REPO
from test_pipeline import _tiny_args

from nemoforge import lineage
from nemoforge.config import Recipe
from nemoforge.signals import owner_alive, owner_id
from nemoforge_cli.main import main
from nemoforge_cli.run import _end_abandoned_runs

LONG_CPT = ["nas.enabled=false", "distill.enabled=false", "cpt.steps=5000", "cpt.checkpoint_every_steps=5000"]
"""The parent, the corpus, then a cpt far too long to finish before the signal."""


def _wait_for_training(proc: subprocess.Popen, workdir: Path, timeout_s: float = 300) -> None:
    """Until cpt's MLflow run is RUNNING and has logged its first metrics (the stage is training).

    MLflow is read only once the step index says cpt runs: by then the command has made the database's tables.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"nemoforge run exited early with code {proc.returncode}"
        if (workdir / "artifacts" / "index" / "cpt").is_dir():
            runs = lineage.Lineage(f"sqlite:///{workdir / 'mlflow.db'}", "nemoforge")
            stages = lineage.pipeline_status(runs)
            if any(s["stage"] == "cpt" and s["state"] == "RUNNING" and s["metrics"] for s in stages):
                return
        time.sleep(1)
    pytest.fail(f"cpt did not start training within {timeout_s:.0f} s")


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.slow
@pytest.mark.parametrize(
    ("signum", "to_group"),
    [(signal.SIGTERM, False), (signal.SIGINT, True)],
    ids=["SIGTERM-to-the-command", "Ctrl-C-to-its-process-group"],
)
def test_signal_stops_the_process_tree_and_marks_the_runs_killed(
    signum: signal.Signals, to_group: bool, tiny_llama_dir: Path, shared_dir: Path, tmp_path: Path, capsys
):
    workdir = tmp_path / "work"
    corpus = shared_dir / "data" / "corpus" / "tinyshakespeare.txt"
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'src'}:{REPO}"}  # the subprocesses import this checkout
    command = [sys.executable, "-m", "nemoforge_cli", *_tiny_args(tiny_llama_dir, corpus, workdir, *LONG_CPT)]
    # its own session, as a shell job (or a pod's main process) has: Ctrl-C reaches that group, not pytest
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip
    try:
        _wait_for_training(proc, workdir)
        tree = psutil.Process(proc.pid).children(recursive=True)
        assert tree, "the task runs as a subprocess of the command"
        if to_group:
            os.killpg(proc.pid, signum)
        else:
            proc.send_signal(signum)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    name = signal.Signals(signum).name
    assert proc.returncode == 128 + signum, err
    assert f"nemoforge: stopped by {name}: pipeline run" in err and "Traceback" not in err
    assert [p.pid for p in tree if _alive(p)] == []
    in_session = [p.pid for p in psutil.process_iter() if _alive(p) and _sid(p.pid) == proc.pid]
    assert in_session == []

    assert main(["status", "--workdir", str(workdir), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["state"] == "KILLED" and report["outcome"] == "retrain"
    stages = {s["stage"]: s for s in report["stages"]}
    assert list(stages) == ["check-inputs", "parent", "corpus", "cpt"]
    assert stages["cpt"]["state"] == "KILLED" and stages["cpt"]["pipeline_state"] == "KILLED"
    assert stages["cpt"]["error"] == f"stopped by {name}"
    assert stages["cpt"]["metrics"]["loss"] > 0  # what it logged before the signal stays
    assert all(s["state"] != "RUNNING" for s in stages.values())
    ended = stages["cpt"]["wall_time_s"]
    time.sleep(1.5)
    assert main(["status", "--workdir", str(workdir), "--json"]) == 0
    again = {s["stage"]: s for s in json.loads(capsys.readouterr().out)["stages"]}
    assert again["cpt"]["wall_time_s"] == ended  # an ended run's wall time no longer grows


def _sid(pid: int) -> int | None:
    try:
        return os.getsid(pid)
    except ProcessLookupError:
        return None


def _gone_owner() -> str:
    """The owner id of a process that has exited."""
    proc = subprocess.Popen(["true"])
    owner = f"{socket.gethostname()} {proc.pid} {psutil.Process(proc.pid).create_time():.2f}"
    proc.wait()
    return owner


def test_owner_alive_tells_a_gone_process_from_a_live_one():
    assert owner_alive(owner_id())
    assert not owner_alive(_gone_owner())
    pid, started = owner_id().split()[-2:]
    assert not owner_alive(f"{socket.gethostname()} {pid} {float(started) - 60:.2f}")  # the pid, reused
    assert owner_alive(f"another-host {pid} {started}")  # cannot be seen from here: left alone


def test_next_run_ends_the_runs_of_a_command_that_is_gone(tmp_path: Path):
    """A `nemoforge run` killed with SIGKILL left its pipeline run and stage run RUNNING: the next one ends them
    FAILED with the reason, and leaves the runs of live commands (and other hosts') alone."""
    recipe = Recipe(name="signals-test", tracking={"mlflow_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"})
    uri, experiment = recipe.tracking.mlflow_uri, recipe.tracking.experiment
    gone = _gone_owner()
    owners = {"gone": gone, "live": owner_id(), "remote": f"another-host {gone.split(' ', 1)[1]}"}
    unfinished = []  # entered, never left (kept referenced: a collected one would end its run KILLED)
    for run_name, owner in owners.items():
        lineage.Lineage(uri, experiment).open_pipeline_run(run_name, recipe)
        lineage.Lineage(uri, experiment).set_pipeline_tags(run_name, {lineage.TAG_OWNER: owner})
        unfinished.append(lineage.Lineage(uri, experiment).stage_run(run_name, "cpt", recipe))
        unfinished[-1].__enter__()

    _end_abandoned_runs(recipe)

    for run_name in owners:
        [cpt] = lineage.pipeline_status(lineage.Lineage(uri, experiment), run_name)
        if run_name == "gone":
            assert (cpt["state"], cpt["pipeline_state"]) == ("FAILED", "FAILED")
            assert cpt["error"] == f"abandoned: the `nemoforge run` that ran it (pid {gone.split()[-2]}) is gone"
        else:
            assert (cpt["state"], cpt["pipeline_state"]) == ("RUNNING", "RUNNING")
