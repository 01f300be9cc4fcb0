#!/usr/bin/env bash
# Build the images of the named dependency sets, each FROM the base pinned in images.yaml, tagged with
# the reference pinned there; with --push, push them and print the digests to pin next to the tags.
#   bash components/images/build.sh train rl serve cli [--push]
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-.venv/bin/python}
push=0
sets=()
for arg in "$@"; do
  if [ "$arg" = --push ]; then push=1; else sets+=("$arg"); fi
done
[ ${#sets[@]} -gt 0 ] || { echo "usage: $0 SET... [--push]  (sets: train rl serve cli)" >&2; exit 2; }
for set in "${sets[@]}"; do
  image=$("$PYTHON" -m nemoforge_components.images ref "$set")
  base=$("$PYTHON" -m nemoforge_components.images base "$set")
  docker build -f "components/images/$set.Dockerfile" --build-arg "BASE_IMAGE=$base" -t "$image" .
  if [ "$push" = 1 ]; then
    docker push "$image"
    echo "$set: pin $(docker inspect --format '{{index .RepoDigests 0}}' "$image") in components/images/images.yaml"
  fi
done
