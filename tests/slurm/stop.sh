#!/usr/bin/env bash
# Stop the daemons tests/slurm/start.sh started (slurmd, slurmctld, munged), by their pid files.
set -uo pipefail
state="${METACL_SLURM_STATE:-/var/tmp/metacl-slurm}"
for pidfile in "$state/slurmd.pid" "$state/slurmctld.pid" /run/munge/munged.pid; do
    if [ -s "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
        kill "$(cat "$pidfile")"
    fi
done
