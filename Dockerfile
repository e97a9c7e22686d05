# syntax=docker/dockerfile:1
#
# spotguard's container image: the daemon that the Helm chart in daemonset/ runs on every GPU spot
# node. Three stages so the final image holds the interpreter and one virtualenv, nothing else:
#   build  - builds spotguard's wheel (no dependencies, no network use beyond the build backend)
#   venv   - installs the wheel and its runtime dependencies into /opt/spotguard
#   final  - the same Python base, plus /opt/spotguard, run as uid 65532
#
# tests/chart/test_image_wheel.py runs this file's RUN commands (paths swapped for temporary ones)
# to prove the wheel installs into a clean venv and `spotguard version` / `spotguard run --help`
# work. CI also builds the image itself: tools/kind/setup.sh and the kind tests (tests/e2e/kind),
# which install the chart with it on a kind cluster.

# Pinned by full version: the final stage's venv links to this exact interpreter.
# Where no registry is reachable, tools/kind/setup.sh builds a local stand-in (Debian bookworm's
# Python 3.11): docker build --build-arg PYTHON_IMAGE=spotguard-python:3.11-bookworm -t spotguard:dev .
ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md /src/
COPY spotguard /src/spotguard
RUN pip wheel --no-deps --wheel-dir /wheels /src

FROM ${PYTHON_IMAGE} AS venv
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
COPY --from=build /wheels /wheels
# No pip inside the venv: the base image's pip installs into it (--python), so the runtime venv
# carries only spotguard and its dependencies. pip compiles the .pyc files here, at build time,
# because the running container has a read-only root filesystem.
RUN python -m venv --without-pip /opt/spotguard && pip --python /opt/spotguard/bin/python install /wheels/*.whl

FROM ${PYTHON_IMAGE}
ARG PYTHON_IMAGE
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="spotguard" \
      org.opencontainers.image.description="Spot/preemptible VM notice handler for vLLM on Kubernetes: cordon, deregister, drain in-flight requests, evict through PDBs." \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="${PYTHON_IMAGE}"
COPY --from=venv /opt/spotguard /opt/spotguard
ENV PATH=/opt/spotguard/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp
# Numeric, so Kubernetes' runAsNonRoot can verify it without an /etc/passwd entry.
USER 65532:65532
EXPOSE 9101
ENTRYPOINT ["spotguard"]
CMD ["run"]
