# dbbatch worker image.   docker build -t dbbatch .   then   docker run IMAGE run /manifests/job.yaml
#
# BASE_IMAGE: any image with Python >= 3.11 (venv module included) and apt-get. The default ships CUDA and a
# matching torch, which the venv below reuses (--system-site-packages) instead of downloading it again.
# scripts/podman_build_run.sh builds the same file on a plain Debian base with a CPU torch wheel.
ARG BASE_IMAGE=pytorch/pytorch:2.8.0-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

# Optional pip constraints file, a path inside the build (e.g. mounted with `podman build -v`): pins torch
# to the wheel the builder provides. Empty: whatever torch the base image has is used.
ARG PIP_CONSTRAINT_FILE=""

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/dbbatch \
    PATH=/opt/dbbatch/bin:$PATH

# tini as PID 1 forwards SIGTERM to dbbatch (which stores a checkpoint and exits 143) and reaps zombies.
# Not `tini -g`: signalling the whole group would kill DataLoader workers before the checkpoint is written.
# Unpinned on purpose: the version comes from whatever distribution BASE_IMAGE is.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends tini \
 && apt-get clean \
 && rm -rf /var/lib/apt/lists/*

# Dependencies first, from pyproject.toml alone: editing the source does not reinstall them.
# EXTRAS adds optional extras' dependencies, e.g. --build-arg EXTRAS="wandb mlflow" (tracking services).
ARG EXTRAS=""
WORKDIR /src
COPY pyproject.toml README.md ./
RUN python3 -m venv --system-site-packages "$VIRTUAL_ENV" \
 && python -c 'import os, tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]; print("\n".join(p["dependencies"] + [d for e in os.environ.get("EXTRAS", "").split() for d in p["optional-dependencies"][e]]))' \
      > requirements.txt \
 && pip install ${PIP_CONSTRAINT_FILE:+--constraint "$PIP_CONSTRAINT_FILE"} --requirement requirements.txt

# The package itself, without dev extras; the source tree is not kept.
COPY dbbatch ./dbbatch
RUN pip install --no-deps . \
 && python -c 'import dbbatch, torch; print("dbbatch", dbbatch.__version__, "torch", torch.__version__)' \
 && rm -rf /src

# A numeric non-root user (Kubernetes' runAsNonRoot can only verify numbers). Everything it writes, the work
# dir, the model and Hugging Face caches, TMPDIR, HOME, lives under /scratch: mount one volume there and the
# root filesystem can be read-only (docker run --read-only -v dbbatch-scratch:/scratch ...).
RUN groupadd --gid 10001 dbbatch \
 && useradd --uid 10001 --gid 10001 --home-dir /scratch/home --no-create-home --shell /usr/sbin/nologin dbbatch \
 && mkdir -p /scratch \
 && chown 10001:10001 /scratch
ENV DBBATCH_WORK_DIR=/scratch/work \
    HF_HOME=/scratch/hf \
    TMPDIR=/scratch \
    HOME=/scratch/home \
    XDG_CACHE_HOME=/scratch/cache
VOLUME ["/scratch"]
WORKDIR /scratch
USER 10001:10001

ENTRYPOINT ["/usr/bin/tini", "--", "dbbatch"]
CMD ["--help"]
