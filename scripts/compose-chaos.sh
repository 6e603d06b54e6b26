#!/usr/bin/env bash
# Nodes of the docker-compose cluster die mid-job. On the same offline images as scripts/compose-smoke.sh
# (and with its functions, scripts/compose-lib.sh), one fault per job, each on a fresh cluster: the tiny
# run is submitted through the Ray head (`ray job submit`, as docs/DEPLOY.md does) and, once its log has
# STEPS_AT steps, one container is SIGKILLed as a crash would (its init process, from the host); its
# restart policy brings it back. Faults:
#   ray-worker      the Ray worker node: the rollout actors die, and the learner if Ray placed it there
#   reward-server   the reward server: the driver waits for it; its pending groups are reclaimed
#   redis           Redis (its volume and append-only file kept): every client retries through it
#   ray-head        the head, and the job's driver with it: once the head is back, the job is submitted
#                   again with --resume (the documented recovery)
# Each job must succeed with: metrics.jsonl holding every step once, no group trained twice and none
# acknowledged and lost (read back from the cluster's Redis: the chaos suite's checks,
# bench/run_checks.py), the killed container healthy again. Recovery time: from the kill to the first
# step the run logged after it (chaos.py's measure); the longest time between two steps from the last
# one before the kill shows the stall. A table of the results ends the output.
#
#   scripts/compose-chaos.sh [FAULT...]          (root: dockerd, debootstrap, and the kill)
#
# Exit status: 0 every fault passed, 1 one failed, 77 skipped (as compose-smoke.sh).
# Environment: RCGRPO_CHAOS_OUT (job logs; default runs/compose-chaos), RCGRPO_CHAOS_PORT_BASE (default
# 21000, so it can run beside the smoke's 20000), RCGRPO_CHAOS_STEPS (default 12), RCGRPO_CHAOS_AT (the
# step the fault waits for; default 5, after the step-4 checkpoint).
set -euo pipefail
cd "$(dirname "$0")/.."
project=rcgrpo-chaos
label="COMPOSE CHAOS"
out=${RCGRPO_CHAOS_OUT:-runs/compose-chaos}
port_base=${RCGRPO_CHAOS_PORT_BASE:-21000}
steps=${RCGRPO_CHAOS_STEPS:-12}
fault_at=${RCGRPO_CHAOS_AT:-5}
# shellcheck source=scripts/compose-lib.sh
. scripts/compose-lib.sh

faults=("$@")
[ ${#faults[@]} -gt 0 ] || faults=(ray-worker reward-server redis ray-head)
for fault in "${faults[@]}"; do
  case $fault in ray-worker | reward-server | redis | ray-head) ;; *) echo "unknown fault: $fault" >&2; exit 2 ;; esac
done

# the job: a checkpoint every fault_at - 1 steps, so a learner restarted (or a job resumed) after the
# fault redoes the steps after it; no held-out evaluation, which no fault touches
job_settings=(--set learner.total_steps="$steps" --set learner.checkpoint_every=$((fault_at - 1)) --set eval.num_samples=0)

# chaos_job SERVICE: one fault on a fresh cluster; appends its row to $out/results.md
chaos_job() {
  local service=$1 log="$out/$1-job.log" logs submitter t0 job_id
  logs=("$log")
  killed_at="" killed_step="" recovery_s="" gap_s="" said=""
  # a fresh cluster, volumes too: the run's directory and streams start empty, as for the first job
  compose down -v --remove-orphans >/dev/null 2>&1
  compose up -d --wait --wait-timeout 300 >/dev/null 2>&1 || { compose ps -a; echo "FAIL: compose up"; return 1; }
  t0=$(date +%s.%N)
  submit_in_background "$log" "${job_settings[@]}"
  kill_at_step "$service" "$fault_at" "$log" "$submitter" || { wait "$submitter" || true; return 1; }
  if [ "$service" = ray-head ]; then
    # the driver ran on the head, so it died with it (and `ray job submit`'s exec with it); the run is
    # in the runs volume and Redis: once the head is back, submit it again with --resume
    if wait "$submitter"; then echo "FAIL: the job's submit survived the head"; return 1; fi
    wait_healthy ray-head || return 1
    echo "the head is back after $(awk -v a="$killed_at" -v b="$(date +%s.%N)" 'BEGIN {printf "%.1f", b - a}') s: submitting again with --resume"
    logs+=("$out/$service-resume-job.log")
    submit "${logs[1]}" "${job_settings[@]}" --resume || { tail -40 "${logs[1]}"; echo "FAIL: the resumed job"; return 1; }
  else
    wait "$submitter" || { tail -40 "$log"; echo "FAIL: ray job submit exited non-zero"; return 1; }
  fi
  job_id=$(job_succeeded "${logs[-1]}") || return 1
  wall_s=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN {printf "%.0f", b - a}')
  echo "OK: job $job_id SUCCEEDED ($(steps_logged "${logs[-1]}") steps in its log)"
  recovered "$service" runs/tiny-shapes "${logs[@]}" || return 1
  if [ "$service" = redis ]; then # what it came back with: its append-only file, on the kept volume
    compose logs --no-color redis 2>&1 | grep -i "append only file" | tail -1 | sed 's/^/  redis said: /' || true
  fi
}

prepare_engine_and_images
mkdir -p "$out"
write_env_file
trap cleanup EXIT
compose down -v --remove-orphans >/dev/null 2>&1 || true
timed "rcgrpo image (compose build, OFFLINE=1)" compose build --quiet

results="$out/results.md"
printf '| fault | result | killed at step | recovery (s) | longest step gap (s) | job wall time (s) | what the run said |\n|---|---|---|---|---|---|---|\n' >"$results"
failed=0
for fault in "${faults[@]}"; do
  say "fault: the $fault container killed at step $fault_at of $steps"
  fault_started=$SECONDS
  # a subshell with errexit of its own, so one failed fault does not stop the others
  set +e
  (
    set -e
    chaos_job "$fault"
    printf '| %s | pass | %s | %s | %s | %s | `%s` |\n' "$fault" "$killed_step" "$recovery_s" "$gap_s" "$wall_s" "$said" >>"$results"
  )
  status=$?
  set -e
  if [ "$status" -ne 0 ]; then
    failed=1
    printf '| %s | FAIL | - | - | - | %s | see %s |\n' "$fault" $((SECONDS - fault_started)) "$out/$fault-job.log" >>"$results"
    compose logs --no-color --tail 20 2>&1 | tail -80 || true
  fi
  timings+=("$(printf '%-44s %4d s' "fault: $fault (cluster up + job)" $((SECONDS - fault_started)))")
done
compose down -v --remove-orphans >/dev/null 2>&1

say "compose chaos $([ "$failed" = 0 ] && echo PASSED || echo FAILED) in $((SECONDS - started)) s"
printf '  %s\n' "${timings[@]}"
echo
cat "$results"
exit "$failed"
