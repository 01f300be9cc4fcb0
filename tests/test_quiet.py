"""`nemoforge run --quiet`: the KFP executor's records leave the console, everything else stays."""

from __future__ import annotations

import io
import json

from nemoforge_cli.quiet import ExecutorLogFilter


def test_executor_records_and_their_json_go_to_the_log():
    executor_input = {"inputs": {"parameterValues": {"recipe_json": "{}"}}, "outputs": {"outputFile": "/x"}}
    subprocess_lines = [
        "[KFP Executor 2026-12-07 10:00:00,000 INFO]: Looking for component `cpt` in --component_module_path `/t.py`",
        "[KFP Executor 2026-12-07 10:00:00,001 INFO]: Got executor_input:",
        *json.dumps(executor_input, indent=4).splitlines(),
        "nemoforge: resuming cpt from step 2",
        "cpt: 100%|##########| 3/3 [00:01<00:00, 2.0step/s]",
        "[KFP Executor 2026-12-07 10:00:09,000 INFO]: Wrote executor output file to /x.",
        "}",  # a stage's own line: only the JSON's closing brace ends the record
    ]
    console, log = io.StringIO(), io.StringIO()
    stream = ExecutorLogFilter(console, log)
    stream.write("10:00:00.000 - INFO - Executing task 'cpt'\n")
    for line in subprocess_lines:  # as kfp.local's indented print writes them: the indent, then the line
        stream.write("    ")
        stream.write(line + "\n")
    stream.write("10:00:09.500 - INFO - Task 'cpt' finished with status SUCCESS")
    stream.finish()

    assert console.getvalue().splitlines() == [
        "10:00:00.000 - INFO - Executing task 'cpt'",
        "    nemoforge: resuming cpt from step 2",
        "    cpt: 100%|##########| 3/3 [00:01<00:00, 2.0step/s]",
        "    }",
        "10:00:09.500 - INFO - Task 'cpt' finished with status SUCCESS",
    ]
    assert "outputFile" in log.getvalue() and len(log.getvalue().splitlines()) == 3 + len(
        json.dumps(executor_input, indent=4).splitlines()
    )
