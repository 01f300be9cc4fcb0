# syntax=docker/dockerfile:1.7
# train: CUDA torch (CUDA 13 wheels) + DeepSpeed + nemoforge: every pipeline task and every TrainJob worker.
# Build from the repository root: bash components/images/build.sh train
# BASE_IMAGE and the image's own tag come from components/images/images.yaml (the one place images are pinned);
# every Python package is pinned with its sha256 in locks/train.txt, installed without resolution.
ARG BASE_IMAGE
FROM ${BASE_IMAGE}

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 DS_BUILD_OPS=0 \
    HOME=/home/nemoforge NEMOFORGE_CACHE=/home/nemoforge/.cache/nemoforge

COPY components/images/locks/train.txt /tmp/lock.txt
RUN pip install --no-deps --require-hashes -r /tmp/lock.txt && rm /tmp/lock.txt

COPY pyproject.toml README.md /src/
COPY src /src/src
COPY components /src/components
COPY pipelines /src/pipelines
COPY cli /src/cli
RUN pip install --no-deps /src && rm -rf /src

# Non-root. The KFP v2 launcher stages artifacts under /s3, /minio and /gcs: make them ours.
RUN useradd --uid 1000 --user-group --create-home --shell /usr/sbin/nologin nemoforge \
    && mkdir -p /s3 /minio /gcs && chown 1000:1000 /s3 /minio /gcs
USER 1000:1000
WORKDIR /home/nemoforge
