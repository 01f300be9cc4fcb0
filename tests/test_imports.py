"""Each stage imports on its own, in a fresh interpreter, as a KFP component's process imports it."""

from __future__ import annotations

import subprocess
import sys

import pytest

from nemoforge.config import STAGES


@pytest.mark.parametrize("stage", STAGES)
def test_stage_imports_alone(stage: str):
    module = f"nemoforge.stages.{stage}"
    done = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr.strip().splitlines()[-1]
