#!/usr/bin/env bash
# The docker-compose cluster, for real, on this machine, without a registry or a package index inside
# the builds: installs and starts what it needs (a Docker engine, Compose v2), builds the offline
# images (scripts/offline-images.sh, scripts/wheelhouse.sh, then the Dockerfile through compose),
# starts the cluster with `docker compose up --build --wait`, submits the tiny run through the Ray head exactly as docs/DEPLOY.md
# does, and checks what a user would look at: the job succeeded; the LoRA and report are in the `runs`
# volume; the reward server scored the job's groups with the run's reward weights; every Prometheus
# target is up with learner, rollout and reward-server metrics; every Grafana panel's query has data
# (scripts/check_grafana_panels.py); the published ports answer; the reward server's container,
# SIGKILLed at step 3 of that job, came back by its restart policy and the run lost no step and no
# acknowledged group, trained none twice (scripts/compose-lib.sh's recovered). Then the
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
project=rcgrpo-smoke
label="COMPOSE SMOKE"
out=${RCGRPO_SMOKE_OUT:-runs/compose-smoke}
port_base=${RCGRPO_SMOKE_PORT_BASE:-20000}
# shellcheck source=scripts/compose-lib.sh
. scripts/compose-lib.sh

# run_job NAME [--kill SERVICE STEP] LIVE_CHECK_ARGS -- SETTINGS...: submit; with --kill, kill the
# service's node once the job has logged STEP steps; check Prometheus while it runs (the live check waits
# for a killed node's targets to come back), then its status; with --kill, that the run recovered
run_job() {
  local name=$1 log="$out/$1-job.log" live_args=() kill_service="" kill_step=""
  shift
  if [ "$1" = "--kill" ]; then kill_service=$2 kill_step=$3; shift 3; fi
  while [ "$1" != "--" ]; do live_args+=("$1"); shift; done
  shift
  submit_in_background "$log" "$@"
  if [ -n "$kill_service" ]; then
    kill_at_step "$kill_service" "$kill_step" "$log" "$submitter" || { wait "$submitter" || true; return 1; }
  fi
  check live "${live_args[@]}" || { wait "$submitter" || true; tail -30 "$log"; return 1; }
  # while the job trains (its learner and workers are scrape targets only while they run): every
  # Grafana panel's query has data on the live Prometheus
  # (the batcher's batch size comes from model-based rewards only; the tiny job's are computed without one)
  compose exec -T ray-head python scripts/check_grafana_panels.py --prometheus http://prometheus:9090 \
    --no-data-expected 'Reward server batch size and queue' ||
    { wait "$submitter" || true; tail -30 "$log"; return 1; }
  wait "$submitter" || { tail -40 "$log"; echo "FAIL: ray job submit exited non-zero"; return 1; }
  local job_id
  job_id=$(job_succeeded "$log")
  grep -E "^step [0-9]+/" "$log" | tail -2
  echo "OK: $name job $job_id SUCCEEDED ($(grep -c '^step ' "$log") steps logged; log: $log)"
  if [ -n "$kill_service" ]; then
    recovered "$kill_service" runs/tiny-shapes "$log"
    echo "OK: the $kill_service container killed at step $killed_step came back; the first step after it $recovery_s s later"
  fi
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

prepare_engine_and_images

mkdir -p "$out"
write_env_file
trap cleanup EXIT
compose --profile standalone down -v --remove-orphans >/dev/null 2>&1 || true

say "the cluster: Redis, Ray head and worker, reward server, Prometheus (up --build --wait)"
# `up --build` as docs/DEPLOY.md says, timed in its two halves: the rcgrpo image, then the cluster
timed "rcgrpo image (compose build, OFFLINE=1)" compose build --quiet
timed "compose up --wait" compose up -d --build --wait --wait-timeout 300
compose ps --format '{{.Service}}: {{.Status}}'
published_ports_answer

say "the tiny run through the Ray head (ray job submit), its reward server killed at step 3"
# a node dies (scripts/compose-chaos.sh kills each in turn): the reward server's container, the cheapest
# to bring back; the driver waits for it, the new server reclaims the groups the dead one had taken
timed "job through Ray, a node killed + live checks" run_job ray --kill reward-server 3 --rollout-workers 2 -- \
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
