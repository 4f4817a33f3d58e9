#!/usr/bin/env bash
# Stop the local SLURM cluster started by up.sh (slurmd per node, slurmctld, and munged unless --keep-munge).
# Jobs still queued or running are cancelled first (stopping slurmd alone leaves their tasks running), and the
# jobs' node-local temporary directories are removed; the state under /var/spool/slurm-local survives.
set -euo pipefail
RUN=/run/slurm-local
stop() {  # stop the daemon whose pid file is $1, waiting up to 10 s
    [ -s "$1" ] || return 0
    local pid; pid="$(cat "$1")"
    kill -0 "$pid" 2>/dev/null || { rm -f "$1"; return 0; }
    echo "[local-slurm] stopping $(basename "$1" .pid) (pid $pid)"
    kill "$pid"
    for _ in $(seq 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    if kill -0 "$pid" 2>/dev/null; then kill -9 "$pid"; fi
    rm -f "$1"
}
if [ -s "$RUN/slurmctld.pid" ] && kill -0 "$(cat "$RUN/slurmctld.pid")" 2>/dev/null; then
    jobs="$(squeue -h -o %i 2>/dev/null || true)"
    if [ -n "$jobs" ]; then
        echo "[local-slurm] cancelling jobs: $(echo $jobs)"
        scancel --full $jobs 2>/dev/null || true
        for _ in $(seq 30); do [ -z "$(squeue -h -t R,CG 2>/dev/null)" ] && break; sleep 1; done
    fi
fi
for pidfile in "$RUN"/slurmd-*.pid; do [ -e "$pidfile" ] && stop "$pidfile"; done
rm -rf /tmp/slurm-local
stop "$RUN/slurmctld.pid"
[ "${1:-}" = --keep-munge ] || stop /run/munge/munged.pid
