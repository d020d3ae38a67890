# syntax=docker/dockerfile:1
# The operator image: `kuberl operator` (kopf, the kubernetes client, the API models). No torch.
#
#   docker build -f docker/operator.Dockerfile -t ghcr.io/kuberl/kuberl-operator:0.1.0 .
#
# Dependencies are pinned by docker/constraints-operator.txt (the versions the tests ran with).
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY docker/constraints-operator.txt docker/
COPY operator/ operator/
COPY runtime/ runtime/
RUN python -m venv /opt/kuberl \
 && /opt/kuberl/bin/pip install --constraint docker/constraints-operator.txt ".[operator]" \
 && /opt/kuberl/bin/python -c "import kuberl_operator.main, sys; assert 'torch' not in sys.modules"

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="kuberl-operator" \
      org.opencontainers.image.description="The kuberl RLJob operator (kopf)" \
      org.opencontainers.image.source="https://github.com/kuberl/kuberl" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 kuberl \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin kuberl
COPY --from=build /opt/kuberl /opt/kuberl
# Read-only root filesystem in the chart: no .pyc writes; /tmp is an emptyDir.
ENV PATH=/opt/kuberl/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp
USER 10001:10001
EXPOSE 8080 8081
ENTRYPOINT ["kuberl"]
CMD ["operator", "--liveness=http://0.0.0.0:8081/healthz"]
