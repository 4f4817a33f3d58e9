#!/bin/sh
# SLURM TaskProlog of the local cluster (installed as /etc/slurm/mlfm-task-prolog.sh by up.sh): every run of a
# job gets its own temporary directory on each node, as on clusters with per-job node-local /tmp. Both nodes
# are this one host, so without it node-local caches (streaming's shard cache) of different nodes would collide.
dir="/tmp/slurm-local/${SLURMD_NODENAME}/job${SLURM_JOB_ID}.${SLURM_RESTART_COUNT:-0}"
mkdir -p "$dir"
echo "export TMPDIR=$dir"
