# rcgrpo image: one image for the Ray head and workers, the reward server, the learner and the
# standalone rollout worker. CPU torch by default; the CUDA build of the same torch version with
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 -t rcgrpo:cu128 .
# Installs the project the way the README does: torch first (pinned), then the project.
FROM python:3.11-slim

ARG TORCH_VERSION=2.13.0
# Empty: the default index (CPU wheels on Linux x86_64 from the local mirror / PyPI's CPU build).
ARG TORCH_INDEX_URL=

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    RAY_USAGE_STATS_ENABLED=0

# curl for the compose/k8s healthchecks; tini so `ray start --block` and uvicorn get signals.
RUN apt-get update \
    && apt-get install -y --no-install-recommends curl tini \
    && rm -rf /var/lib/apt/lists/*

RUN python3 -m pip install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "torch==${TORCH_VERSION}"

WORKDIR /app
# Dependencies in their own layer (from pyproject's pins), so a code change does not reinstall them.
COPY pyproject.toml ./
RUN python3 -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && python3 -m pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

COPY . .
RUN python3 -m pip install --no-deps -e . \
    && useradd --create-home --uid 1000 rcgrpo \
    && mkdir -p /app/runs /data /models \
    && chown rcgrpo:rcgrpo /app/runs /data /models

USER rcgrpo
EXPOSE 8265 8600 9101 9102
ENTRYPOINT ["tini", "--"]
CMD ["rcgrpo", "--help"]
