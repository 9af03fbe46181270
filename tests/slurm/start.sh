#!/usr/bin/env bash
# Start a one-node Slurm cluster on localhost (munged, slurmctld, slurmd) for metacl's Slurm
# tests, and wait until the node is idle. Needs root and the slurm-wlm + munge packages
# (.ci/slurm_setup.sh installs them). Safe to run again: a cluster that answers is left alone.
#   METACL_SLURM_STATE   daemon state, logs and pid files (default /var/tmp/metacl-slurm)
#   METACL_SLURM_CPUS    CPUs the node advertises (default max(6, nproc): test runs are tiny)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
state="${METACL_SLURM_STATE:-/var/tmp/metacl-slurm}"
conf=/etc/slurm/slurm.conf
marker="# metacl test cluster"

node_idle() { sinfo -h -N -n localhost -o '%T' 2>/dev/null | grep -Eq '^(idle|mixed|allocated)'; }

if node_idle; then
    echo "slurm: already running ($(sinfo -h -N -o '%N %T'))"
    exit 0
fi
[ "$(id -u)" = 0 ] || { echo "slurm: must run as root to start the daemons" >&2; exit 1; }
for binary in munged slurmctld slurmd sinfo; do
    command -v "$binary" >/dev/null || { echo "slurm: $binary not installed (run .ci/slurm_setup.sh)" >&2; exit 1; }
done
if [ -e "$conf" ] && ! head -1 "$conf" | grep -q "$marker"; then
    echo "slurm: $conf exists and was not written by metacl; refusing to replace it" >&2
    exit 1
fi

cpus="${METACL_SLURM_CPUS:-$(( $(nproc) > 6 ? $(nproc) : 6 ))}"
mem_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 8 / 10 ))
mkdir -p "$state/ctld" "$state/d" /etc/slurm
sed -e "s|@STATE@|$state|g" -e "s|@CPUS@|$cpus|g" -e "s|@MEM@|$mem_mb|g" \
    "$here/slurm.conf.in" > "$conf"

# munge: a key readable only by the munge user, then the daemon as that user.
mkdir -p /etc/munge /run/munge /var/log/munge /var/lib/munge
if [ ! -s /etc/munge/munge.key ]; then
    dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
fi
chown -R munge:munge /etc/munge /run/munge /var/log/munge /var/lib/munge
chmod 0700 /etc/munge
chmod 0400 /etc/munge/munge.key
if ! munge -n >/dev/null 2>&1; then
    runuser -u munge -- /usr/sbin/munged
    for _ in $(seq 50); do munge -n >/dev/null 2>&1 && break; sleep 0.1; done
fi
munge -n | unmunge >/dev/null || { echo "slurm: munged does not answer" >&2; exit 1; }

# Stale daemons from an earlier start would hold the ports.
for daemon in slurmctld slurmd; do
    if [ -s "$state/$daemon.pid" ] && kill -0 "$(cat "$state/$daemon.pid")" 2>/dev/null; then
        kill "$(cat "$state/$daemon.pid")"; sleep 1
    fi
done
slurmctld -c            # -c: start clean, forget jobs of an earlier cluster
slurmd -N localhost

for _ in $(seq 120); do
    if node_idle; then
        echo "slurm: ready ($(sinfo -h -N -o '%N %T %c CPUs'))"
        exit 0
    fi
    scontrol update nodename=localhost state=resume >/dev/null 2>&1 || true
    sleep 0.5
done
echo "slurm: node never became idle; see $state/slurmctld.log and $state/slurmd.log" >&2
sinfo -N -l >&2 || true
tail -20 "$state/slurmctld.log" "$state/slurmd.log" >&2 || true
exit 1
