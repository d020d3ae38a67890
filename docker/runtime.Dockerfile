# syntax=docker/dockerfile:1
# The runtime image: `kuberl-runtime`, the program inside every RLJob pod (torch, transformers).
#
#   docker build -f docker/runtime.Dockerfile -t ghcr.io/kuberl/kuberl-runtime:0.1.0 .
#   docker build -f docker/runtime.Dockerfile --target vllm -t ghcr.io/kuberl/kuberl-runtime:0.1.0-vllm .
#
# The default (last) stage is `runtime`; `vllm` adds vLLM as the optional rollout engine (vLLM pins
# its own torch, so that image carries vLLM's torch). Dependencies are pinned by
# docker/constraints-runtime.txt. The user is 1000, the uid the operator's pods run as.
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
ARG VLLM_VERSION=0.33.0

FROM ${CUDA_IMAGE} AS base
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# The CUDA image's tag pins the Ubuntu snapshot; its python3.12 is the only Python installed.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/kuberl \
 && (userdel --remove ubuntu 2>/dev/null || true) \
 && groupadd --gid 1000 kuberl \
 && useradd --uid 1000 --gid 1000 --create-home --shell /usr/sbin/nologin kuberl
ENV PATH=/opt/kuberl/bin:$PATH PYTHONUNBUFFERED=1 NCCL_DEBUG=WARN

FROM base AS deps
WORKDIR /src
COPY pyproject.toml README.md ./
COPY docker/constraints-runtime.txt docker/
COPY operator/ operator/
COPY runtime/ runtime/
RUN pip install --constraint docker/constraints-runtime.txt ".[runtime]"

FROM deps AS vllm
ARG VLLM_VERSION
RUN pip install "vllm==${VLLM_VERSION}"
WORKDIR /home/kuberl
USER 1000:1000
ENTRYPOINT ["kuberl-runtime"]

FROM deps AS runtime
WORKDIR /home/kuberl
USER 1000:1000
ENTRYPOINT ["kuberl-runtime"]
