#!/usr/bin/env bash
# stop_local_slurm.sh - stop exactly what start_local_slurm.sh started, using
# its pid files (slurmd, slurmctld, munged).  Running/pending jobs are
# cancelled through Slurm first.  Idempotent.  (Project copy of the shared tool.)
#   --purge   also delete $SLURM_LOCAL_DIR (config, state, logs, munge key)
set -uo pipefail

BASE=${SLURM_LOCAL_DIR:-${TMPDIR:-/tmp}/local-slurm}
CONF=$BASE/etc/slurm.conf
export SLURM_CONF=$CONF
log() { echo "[stop_local_slurm] $*" >&2; }

alive() {   # pidfile binary-name
  local pf=$1 name=$2 pid
  [ -s "$pf" ] || return 1
  pid=$(cat "$pf" 2>/dev/null) || return 1
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  [ -r "/proc/$pid/comm" ] && [ "$(cat /proc/$pid/comm)" = "$name" ] || return 1
  [ "$(awk '/^State:/ {print $2}' /proc/$pid/status)" != Z ]
}

stop_pid() {   # pidfile binary-name
  local pf=$1 name=$2 pid
  if ! alive "$pf" "$name"; then
    rm -f "$pf"; log "$name not running"; return 0
  fi
  pid=$(cat "$pf")
  kill -TERM "$pid"
  for _ in $(seq 75); do alive "$pf" "$name" || break; sleep 0.2; done
  if alive "$pf" "$name"; then
    log "$name (pid $pid) ignored SIGTERM, sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$pf"
  log "stopped $name (pid $pid)"
}

# 1. cancel jobs while the controller is still up (kills their slurmstepd's)
if alive "$BASE/slurmctld.pid" slurmctld && [ -f "$CONF" ]; then
  if [ -n "$(squeue -h -o %A 2>/dev/null)" ]; then
    log "cancelling remaining jobs"
    scancel --full $(squeue -h -o %A) 2>/dev/null || true
    for _ in $(seq 40); do [ -z "$(squeue -h -t R,CG,PD -o %A 2>/dev/null)" ] && break; sleep 0.5; done
  fi
fi

# 2. daemons, in reverse start order
stop_pid "$BASE/slurmd.pid" slurmd
stop_pid "$BASE/slurmctld.pid" slurmctld
stop_pid "$BASE/munge/munged.pid" munged

# 3. undo the /etc/slurm/slurm.conf symlink if it is ours
if [ -L /etc/slurm/slurm.conf ] && [ "$(readlink /etc/slurm/slurm.conf)" = "$CONF" ]; then
  rm -f /etc/slurm/slurm.conf
fi

if [ "${1:-}" = --purge ]; then
  case "$BASE" in /|/tmp|/etc|/usr|/var|"") log "refusing to purge $BASE" ;; *) rm -rf "$BASE"; log "purged $BASE" ;; esac
fi
exit 0
