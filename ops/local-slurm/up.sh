#!/usr/bin/env bash
# Install (when missing) and start a 2-node SLURM cluster on this host, then wait until both nodes are idle.
# Idempotent: a second run changes nothing and returns once `sinfo` shows node1 and node2 idle. Needs root.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
NODES=(node1 node2)
RUN=/run/slurm-local
CONF=/etc/slurm/slurm.conf
log() { echo "[local-slurm] $*"; }

[ "$(id -u)" = 0 ] || { echo "up.sh: run as root (it installs packages and starts daemons)" >&2; exit 1; }

# 1. Packages
if ! dpkg -s slurm-wlm munge >/dev/null 2>&1; then
    log "installing slurm-wlm and munge"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
fi

# 2. munge: a key, then the daemon
if [ ! -s /etc/munge/munge.key ]; then
    log "creating /etc/munge/munge.key"
    mungekey --create --keyfile=/etc/munge/munge.key 2>/dev/null \
        || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
fi
chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
mkdir -p /run/munge /var/log/munge /var/lib/munge && chown munge:munge /run/munge /var/log/munge /var/lib/munge
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    log "starting munged"
    runuser -u munge -- /usr/sbin/munged
    for _ in $(seq 20); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.5; done
    munge -n | unmunge >/dev/null
fi

# 3. Node names resolve to this host
for node in "${NODES[@]}"; do
    grep -qE "^127\.0\.0\.1\s.*\b${node}\b" /etc/hosts || echo "127.0.0.1 ${node}" >> /etc/hosts
done

# 4. slurm.conf: this host's name, its real CPU count and memory on every node
host="$(hostname -s)"
cpus="$(nproc)"
memory_mb="$(awk '/^MemTotal:/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)"
mkdir -p /etc/slurm "$RUN" /var/log/slurm-local /var/spool/slurm-local/ctld
rendered="$(sed -e "s/@HOST@/${host}/g" -e "s/@CPUS@/${cpus}/g" -e "s/@MEMORY_MB@/${memory_mb}/g" \
    "$HERE/slurm.conf.in")"
running() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
install -m 755 "$HERE/task_prolog.sh" /etc/slurm/mlfm-task-prolog.sh
if [ ! -f "$CONF" ] || [ "$rendered" != "$(cat "$CONF")" ]; then
    if running "$RUN/slurmctld.pid" || ls "$RUN"/slurmd-*.pid >/dev/null 2>&1; then
        log "slurm.conf changed: restarting the cluster"
        "$HERE/down.sh" --keep-munge
    fi
    printf '%s\n' "$rendered" > "$CONF"
    log "wrote $CONF ($cpus CPUs and ${memory_mb} MB per node)"
fi

# 5. Daemons
if ! running "$RUN/slurmctld.pid"; then
    log "starting slurmctld"
    slurmctld
fi
for node in "${NODES[@]}"; do
    if ! running "$RUN/slurmd-${node}.pid"; then
        log "starting slurmd -N ${node}"
        # its own mount namespace with a private /dev/shm: nodes of a real cluster share no shared memory
        unshare --mount --propagation private sh -c "mount -t tmpfs tmpfs /dev/shm && exec slurmd -N ${node}"
    fi
done

# 6. Wait for both nodes usable: idle, or running jobs of an earlier call (resume nodes left down or drained by
#    an earlier unclean stop)
for i in $(seq 90); do
    states="$(sinfo -h -N -o '%N %t' 2>/dev/null | sort -u || true)"
    if [ "$(grep -cE ' (idle|mix|alloc|comp)$' <<<"$states")" = "${#NODES[@]}" ]; then
        log "up: $(tr '\n' ' ' <<<"$states")"
        exit 0
    fi
    if [ "$i" = 10 ] && grep -qE ' (down|drain|drng|fail)\*?$' <<<"$states"; then
        scontrol update nodename="$(IFS=,; echo "${NODES[*]}")" state=resume 2>/dev/null || true
    fi
    sleep 1
done
echo "up.sh: nodes not usable after 90 s: $(tr '\n' ' ' <<<"$states"); see /var/log/slurm-local/" >&2
exit 1
