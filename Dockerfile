# rcgrpo image: one image for the Ray head and workers, the reward server, the learner and the
# standalone rollout worker. Installs the project the way the README does: torch first (pinned), then
# the project. CPU torch by default; the same file builds the CUDA image:
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 -t rcgrpo:cu128 .
# Without a registry or a package index (docs/DEPLOY.md, "Offline"): a local base image and the wheels
# from scripts/wheelhouse.sh:
#   docker build --build-arg BASE_IMAGE=rcgrpo-offline/debian:bookworm --build-arg OFFLINE=1 -t rcgrpo:latest .
ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS base
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    RAY_USAGE_STATS_ENABLED=0 \
    VIRTUAL_ENV=/opt/rcgrpo \
    PATH=/opt/rcgrpo/bin:$PATH
# curl for the compose/k8s healthchecks; tini so `ray start --block` and uvicorn get signals. Only
# what the base image lacks is installed (a base made by scripts/offline-images.sh has both).
RUN if ! command -v curl >/dev/null || ! command -v tini >/dev/null; then \
        apt-get update \
        && apt-get install -y --no-install-recommends curl tini \
        && rm -rf /var/lib/apt/lists/*; \
    fi

# -- the Python dependencies, in their own stage so a code change does not reinstall them ----------
FROM base AS dependencies
# A virtual environment: the same layout on python:3.11-slim and on Debian's own (externally
# managed) python3. Made here only: the image copies it whole.
RUN python3 -m venv "$VIRTUAL_ENV"
ARG TORCH_VERSION=2.13.0
# Empty: the default index. https://download.pytorch.org/whl/cu128: the CUDA 12.8 build.
ARG TORCH_INDEX_URL=
# 1: install every Python package from wheelhouse/ only (pip --no-index); the wheels stay in this stage.
ARG OFFLINE=
COPY wheelhouse/ /wheelhouse/
RUN if [ -n "$OFFLINE" ] && ! ls /wheelhouse/*.whl >/dev/null 2>&1; then \
        echo "OFFLINE=1 but wheelhouse/ has no wheels: run scripts/wheelhouse.sh first" >&2; exit 1; \
    fi
RUN pip install ${OFFLINE:+--no-index --find-links /wheelhouse} \
        ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "torch==${TORCH_VERSION}"
COPY pyproject.toml /tmp/
# pyproject's pinned dependencies and its build requirements (the project is installed below with them).
RUN python3 -c "import tomllib; p = tomllib.load(open('/tmp/pyproject.toml', 'rb')); print('\n'.join(p['project']['dependencies'] + p['build-system']['requires']))" \
        > /tmp/requirements.txt \
    && pip install ${OFFLINE:+--no-index --find-links /wheelhouse} -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt /tmp/pyproject.toml

# -- the source, without the wheelhouse ------------------------------------------------------------
FROM base AS source
COPY . /app
RUN rm -rf /app/wheelhouse

# -- the image -------------------------------------------------------------------------------------
FROM base
COPY --from=dependencies /opt/rcgrpo /opt/rcgrpo
WORKDIR /app
COPY --from=source /app /app
RUN pip install --no-deps --no-build-isolation -e . \
    && useradd --create-home --uid 1000 rcgrpo \
    && mkdir -p /app/runs /data /models /run/rcgrpo/metrics-targets \
    && chown rcgrpo:rcgrpo /app/runs /data /models /run/rcgrpo/metrics-targets

USER rcgrpo
EXPOSE 8265 8600 9100 9101 9102
ENTRYPOINT ["tini", "--"]
CMD ["rcgrpo", "--help"]
