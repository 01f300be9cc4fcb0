"""Compile time per built-in recipe, compiled YAML size, and what each task requests on the cluster.

    .venv/bin/python benchmarks/compile_report.py [--repeats 5] [--json benchmarks/results/compile_report.json]

Prints two Markdown tables (the README's). Compile time: ``nemoforge compile RECIPE`` as a fresh process (what
a user waits for: mostly imports), and ``compile_recipe`` in-process (the median of ``--repeats`` after one
warm-up: the pipeline build itself). Size: the checked-in ``pipelines/compiled/<recipe>.yaml``. Requests:
read back from that YAML by ``pipelines/compiled/requests_table.py`` (``↳`` rows: the TrainJob pods a
launcher task creates).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMPILED = REPO / "pipelines" / "compiled"


def measure(name: str, repeats: int) -> dict:
    """Wall seconds of the CLI compile (one fresh process) and of the in-process compile (median), and the size."""
    from nemoforge.config import load_recipe
    from nemoforge_pipelines import compile_recipe

    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "nemoforge_cli", "compile", name, "-o", f"{tmp}/cli.yaml"],
            check=True, capture_output=True,
        )  # fmt: skip
        cli_s = time.perf_counter() - started
        recipe = load_recipe(name)
        times = []
        for _ in range(repeats + 1):  # the first builds KFP's caches: left out
            started = time.perf_counter()
            compile_recipe(recipe, Path(tmp) / "p.yaml")
            times.append(time.perf_counter() - started)
    text = (COMPILED / f"{name}.yaml").read_text()
    return {
        "recipe": name,
        "cli_compile_s": round(cli_s, 2),
        "compile_recipe_median_s": round(statistics.median(times[1:]), 3),
        "yaml_bytes": len(text.encode()),
        "yaml_lines": text.count("\n"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="in-process compiles per recipe (%(default)s)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    sys.path.insert(0, str(COMPILED))
    from requests_table import main as print_requests

    from nemoforge.config import builtin_recipes

    results = [measure(name, args.repeats) for name in builtin_recipes()]
    print(f"| recipe | `nemoforge compile` (fresh process) | `compile_recipe` in-process (median of {args.repeats}) "
          "| compiled YAML |")
    print("|---|---|---|---|")
    for r in results:
        print(f"| {r['recipe']} | {r['cli_compile_s']:.1f} s | {r['compile_recipe_median_s']:.3f} s "
              f"| {r['yaml_bytes']:,} B, {r['yaml_lines']} lines |")
    print()
    print_requests()
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
