#!/usr/bin/env bash
# `make test-slurm`: install a single-node Slurm from Debian's packages if it is missing, start it, run
# tests/integration/slurm against it, and stop the daemons by pid at the end, also on failure (trap).
# Every wait is bounded; the Makefile also bounds the whole run (timeout). Needs root and apt-get.
set -euo pipefail
cd "$(dirname "$0")/../../.."
HERE=tests/integration/slurm
BIN=${BIN:-.venv/bin}
started=$(date +%s)

if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "test-slurm: needs root and apt-get (it installs slurmctld, slurmd and munge from Debian's packages)" >&2
    exit 2
fi

finish() {
    local rc=$?
    trap - EXIT
    if [ "$rc" -ne 0 ]; then
        echo "test-slurm: failed (exit $rc); the daemons' logs:" >&2
        bash "$HERE/cluster.sh" logs || true
    fi
    bash "$HERE/cluster.sh" stop || true
    echo "test-slurm: exit $rc after $(($(date +%s) - started)) s"
    exit "$rc"
}
trap finish EXIT
trap 'exit 143' TERM INT

bash "$HERE/cluster.sh" install
bash "$HERE/cluster.sh" start
eval "$(bash "$HERE/cluster.sh" env)"
export SLURM_CONF
# --foreground: pytest stays in this process group, so a signal to the group (make's timeout) reaches it
MERGEBENCH_SLURM=1 timeout --foreground -k 10 420 "$BIN/pytest" -q -p no:cacheprovider "$HERE"
