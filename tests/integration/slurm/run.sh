#!/usr/bin/env bash
# `make test-slurm`: install a single-node Slurm from Debian's packages if it is missing, start it, run
# tests/integration/slurm against it, and stop the daemons by pid at the end, also on failure (trap).
# Every wait is bounded; the Makefile bounds the whole run (10 minutes). Needs root and apt-get.
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
# make's timeout signals the whole process group (pytest and what it started); the daemons, in their own
# sessions, are left to `finish`, which cancels the jobs and stops them
trap 'echo "test-slurm: interrupted (timed out?)" >&2; exit 124' TERM INT

bash "$HERE/cluster.sh" install
bash "$HERE/cluster.sh" start
eval "$(bash "$HERE/cluster.sh" env)"
export SLURM_CONF
# micro is built once into a cache of this test's own and reused by later runs (it is content-addressed)
export MERGEBENCH_TEST_CACHE=${MERGEBENCH_SLURM_DIR:-/tmp/mergebench-slurm}/cache
# every wait in the test has its own limit; the whole run is bounded by the Makefile's timeout
MERGEBENCH_SLURM=1 "$BIN/pytest" -q -p no:cacheprovider "$HERE"
