#!/usr/bin/env bash
# Stop the single-node cluster started by .ci/slurm-up.sh: cancel leftover jobs, then stop the
# daemons it started, by their pid files only (never by name). Safe to run when nothing is up.
# The state dir (logs included) stays for inspection; the next slurm-up.sh starts from a fresh one.
# Env: SLURM_CI_BASE (the state dir, as for slurm-up.sh)
BASE=${SLURM_CI_BASE:-${TMPDIR:-/tmp}/dpm-slurm}
[ -d "$BASE/run" ] || exit 0

alive() {  # running and not a zombie (PID 1 here may reap exited daemons late)
  [ -r "/proc/$1/stat" ] && [ "$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" != Z ]
}
stop() {   # stop <pidfile>
  [ -s "$1" ] || return 0
  local pid; pid=$(cat "$1")
  if alive "$pid"; then
    kill -TERM "$pid"
    for _ in $(seq 100); do alive "$pid" || break; sleep 0.1; done
    alive "$pid" && { echo "slurm-down: SIGKILL $1 ($pid)" >&2; kill -KILL "$pid"; }
  fi
  rm -f "$1"
}

if [ -s "$BASE/run/slurmctld.pid" ] && alive "$(cat "$BASE/run/slurmctld.pid")"; then
  # Drop leftover jobs first, so that no job step outlives slurmd.
  squeue -h -o %A 2>/dev/null | xargs -r scancel --full 2>/dev/null || true
  for _ in $(seq 75); do [ -z "$(squeue -h 2>/dev/null)" ] && break; sleep 0.2; done
fi
stop "$BASE/run/slurmd.pid"
stop "$BASE/run/slurmctld.pid"
stop "$BASE/run/slurmdbd.pid"
stop "$BASE/run/mariadbd.pid"
stop "$BASE/run/munged.pid"      # only present if slurm-up.sh started munged
exit 0
