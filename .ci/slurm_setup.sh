#!/usr/bin/env bash
# CI: install Slurm and munge (Debian packages) if needed, then start a one-node cluster on
# localhost for the Slurm launcher tests (tests/slurm/start.sh). Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
fi
tests/slurm/start.sh
echo "slurm setup took $(( $(date +%s) - start ))s"
