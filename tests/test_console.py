"""`nemoforge run`'s console (issue 15 §4): each step's start, progress, messages and end; the KFP executor's
detail in the task logs; no colour codes or redrawn bars where the console is not a terminal."""

from __future__ import annotations

import io
import json
from pathlib import Path

from nemoforge_cli.console import TaskConsole

EXECUTOR_INPUT = {"inputs": {"parameterValues": {"recipe_json": "{}"}}, "outputs": {"outputFile": "/x"}}
TASK_LINES = [
    "[KFP Executor 2026-12-07 10:00:00,000 INFO]: Looking for component `cpt` in --component_module_path `/t.py`",
    "[KFP Executor 2026-12-07 10:00:00,001 INFO]: Got executor_input:",
    *json.dumps(EXECUTOR_INPUT, indent=4).splitlines(),
    "Loading weights:   0%|          | 0/272 [00:00<?, ?it/s]",
    "Loading weights: 100%|##########| 272/272 [00:00<00:00, 3000it/s]",
    "[KFP Executor 2026-12-07 10:00:01,000 INFO]: cpt: 3 steps of 4 x 256 tokens",
    "nemoforge: resuming cpt from step 2",
    "cpt:  33%|###       | 1/3 [00:01<00:02, 1.0step/s]",
    "cpt: 100%|##########| 3/3 [00:03<00:00, 1.0step/s]",
    "[KFP Executor 2026-12-07 10:00:05,000 WARNING]: cpt: loss rose",
    "[KFP Executor 2026-12-07 10:00:09,000 INFO]: Wrote executor output file to /x.",
    "}",  # a stage's own line: only the JSON's closing brace ends the record
    "",
]


def _run(tty: bool, progress: bool, log_dir: Path) -> str:
    console = io.StringIO()
    stream = TaskConsole(console, log_dir, tty=tty, progress=progress)
    stream.write("10:00:00.000 - INFO - Running pipeline: \x1b[95m'nemoforge-demo'\x1b[0m\n" + "-" * 80 + "\n")
    stream.write("10:00:00.000 - INFO - Executing task \x1b[96m'cpt'\x1b[0m\n10:00:00.000 - INFO - Streamed logs:\n\n")
    for line in TASK_LINES:  # as kfp.local's indented print writes them: the indent, then the line
        stream.write("    ")
        stream.write(line + "\n")
    stream.write("\n10:00:09.500 - INFO - Task \x1b[96m'cpt'\x1b[0m finished with status \x1b[92mSUCCESS\x1b[0m\n")
    stream.write("10:00:09.500 - INFO - Task \x1b[96m'cpt'\x1b[0m outputs:\n    model: Model( name='model',\n")
    stream.write("                 metadata={'digest': 'abc'} )\n" + "-" * 80)
    stream.finish()
    return console.getvalue()


def test_console_keeps_steps_messages_and_last_bar_state_without_colour(tmp_path: Path):
    out = _run(tty=False, progress=True, log_dir=tmp_path / "logs")
    assert out.splitlines() == [
        "10:00:00.000 - INFO - Running pipeline: 'nemoforge-demo'",
        "-" * 80,
        "10:00:00.000 - INFO - Executing task 'cpt'",
        "    Loading weights: 100%|##########| 272/272 [00:00<00:00, 3000it/s]",
        "    cpt: 3 steps of 4 x 256 tokens",
        "    nemoforge: resuming cpt from step 2",
        "    cpt: 100%|##########| 3/3 [00:03<00:00, 1.0step/s]",
        "    WARNING: cpt: loss rose",
        "    }",
        "10:00:09.500 - INFO - Task 'cpt' finished with status SUCCESS",
        "-" * 80,
    ]
    log = (tmp_path / "logs" / "cpt.log").read_text()
    assert "\x1b" not in log and "outputFile" in log and "metadata={'digest': 'abc'}" in log
    assert "[KFP Executor 2026-12-07 10:00:01,000 INFO]: cpt: 3 steps" in log and "1/3 [00:01" not in log
    assert "Running pipeline" not in log  # before the first task: console only


def test_quiet_console_has_no_bars(tmp_path: Path):
    out = _run(tty=False, progress=False, log_dir=tmp_path)
    assert "%|" not in out and "resuming cpt from step 2" in out and "finished with status SUCCESS" in out
    assert "cpt: 100%|" in (tmp_path / "cpt.log").read_text()


def test_terminal_keeps_colour_and_redraws_bars_in_place(tmp_path: Path):
    out = _run(tty=True, progress=True, log_dir=tmp_path)
    assert "\x1b[96m'cpt'\x1b[0m" in out
    assert "\r\x1b[K    cpt:  33%|" in out and "\r\x1b[K    cpt: 100%|##########| 3/3 [00:03<00:00, 1.0step/s]\n" in out
    assert "outputFile" not in out and "Streamed logs" not in out


def test_a_long_bar_is_written_every_bar_every_s_off_the_terminal(tmp_path: Path):
    from nemoforge_cli.console import BAR_EVERY_S

    now = [0.0]
    console = io.StringIO()
    stream = TaskConsole(console, tmp_path, tty=False, clock=lambda: now[0])
    stream.write("10:00:00.000 - INFO - Executing task 'cpt'\n")
    for step in range(5):  # one update every BAR_EVERY_S / 2 seconds
        stream.write(f"    cpt:  {step * 20}%|##   | {step}/5 [00:0{step}<00:05]\n")
        now[0] += BAR_EVERY_S / 2
    stream.write("    cpt: 100%|#####| 5/5 [00:05<00:00]\n    done\n")
    stream.finish()
    assert console.getvalue().splitlines() == [
        "10:00:00.000 - INFO - Executing task 'cpt'",
        "    cpt:  40%|##   | 2/5 [00:02<00:05]",
        "    cpt:  80%|##   | 4/5 [00:04<00:05]",
        "    cpt: 100%|#####| 5/5 [00:05<00:00]",
        "    done",
    ]
