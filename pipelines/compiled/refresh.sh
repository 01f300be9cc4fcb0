#!/usr/bin/env bash
# Recompile every built-in recipe into pipelines/compiled/<recipe>.yaml (CI fails when these are stale:
# tests/test_cluster_compile.py). Run after changing a recipe, a component or the pipeline builder.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-.venv/bin/python}
for recipe in $("$PYTHON" -c "from nemoforge.config import builtin_recipes; print(' '.join(builtin_recipes()))"); do
  "$PYTHON" -m nemoforge_cli compile "$recipe" -o "pipelines/compiled/$recipe.yaml"
done
