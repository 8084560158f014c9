# nemo-checkpointless on an NVIDIA NGC NeMo Framework (or PyTorch) image.
#
#   docker build -t REGISTRY/ncl:TAG .                       # from the repository root
#   docker build --build-arg BASE_IMAGE=nvcr.io/nvidia/nemo:26.06 -t REGISTRY/ncl:TAG .
#   docker build --build-arg BASE_IMAGE=nvcr.io/nvidia/pytorch:26.04-py3 \
#       --build-arg MEGATRON_CORE=megatron-core==0.18.0 -t REGISTRY/ncl:TAG .
#
# The image's torch, megatron-core, Transformer Engine, NCCL and CUDA are kept as they are:
# this package is installed with --no-deps, and only the pure-Python dependencies that are
# missing are added, under a constraint that pins whatever torch and megatron-core the image
# has (the build fails if either changed): docker/install.py. Which base ships what:
# docs/launch.md, "The container image". ncl-launch is on PATH; tini is PID 1: it reaps
# orphans and forwards SIGTERM and SIGUSR1 to its child only (no -g), ncl-launch, which
# tells its ranks (they must not get SIGTERM before their agent asks for a checkpoint).
ARG BASE_IMAGE=nvcr.io/nvidia/nemo:26.02
FROM ${BASE_IMAGE}

# only on a base without megatron-core (NGC PyTorch): the pip requirement to add, no deps
ARG MEGATRON_CORE=""

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# root, as the NGC bases run: apt-get here; at run time RDMA needs locked memory (IPC_LOCK)
# and pyxis/enroot map the submitting user anyway
# hadolint ignore=DL3002
USER 0

# tini as PID 1; numactl for `numactl --hardware` when checking rank binding (docs/launch.md)
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini numactl \
    && rm -rf /var/lib/apt/lists/* \
    && tini --version

WORKDIR /workspace/nemo_checkpointless
COPY pyproject.toml README.md ./
COPY nemo_checkpointless ./nemo_checkpointless
COPY conf ./conf
COPY recipes ./recipes
COPY docker/install.py ./docker/install.py

# `python` is the image's own: NeMo bases put a venv (/opt/venv, system site-packages
# visible) first on PATH and `python -m pip` installs into it; NGC PyTorch bases use the
# system Python (PIP_BREAK_SYSTEM_PACKAGES: as the image's own installs do)
RUN PIP_BREAK_SYSTEM_PACKAGES=1 python docker/install.py --megatron-core "${MEGATRON_CORE}" . \
    && rm -rf build ./*.egg-info

ENV PYTHONUNBUFFERED=1

ENTRYPOINT ["tini", "--"]
CMD ["ncl-launch", "--help"]
