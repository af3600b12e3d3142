#!/usr/bin/env bash
# A single-node Slurm cluster on this machine, for the integration test: munged, slurmctld and slurmd started
# directly as background processes (no systemd), their pids recorded in $DIR/*.pid, every file under $DIR.
#
#   cluster.sh install   apt-get update once and install slurmctld, slurmd, munge, slurm-client if missing
#   cluster.sh start     write the config, start the daemons, wait (bounded) until the node is idle
#   cluster.sh stop      cancel every job, stop the daemons by their recorded pids
#   cluster.sh logs      print the daemons' logs
#   cluster.sh env       the variables a client needs (SLURM_CONF), for `eval`
#
# DIR is $MERGEBENCH_SLURM_DIR (default /tmp/mergebench-slurm). Clients read $DIR/slurm.conf through SLURM_CONF,
# so nothing under /etc is changed. No accounting (no slurmdbd), ProctrackType=proctrack/linuxproc,
# TaskPlugin=task/none, so it runs without cgroups in a container.
set -euo pipefail

DIR=${MERGEBENCH_SLURM_DIR:-/tmp/mergebench-slurm}
CTLD_PORT=${MERGEBENCH_SLURMCTLD_PORT:-6817}
SLURMD_PORT=${MERGEBENCH_SLURMD_PORT:-6818}
PACKAGES=(slurmctld slurmd munge slurm-client)
export SLURM_CONF=$DIR/slurm.conf

say() { echo "[slurm-cluster] $*" >&2; }

# wait_for SECONDS DESCRIPTION COMMAND...: poll COMMAND every second until it succeeds; fail after SECONDS.
wait_for() {
    local limit=$1 what=$2 t=0
    shift 2
    until "$@" >/dev/null 2>&1; do
        t=$((t + 1))
        if [ "$t" -ge "$limit" ]; then
            say "timed out after ${limit}s waiting for $what"
            return 1
        fi
        sleep 1
    done
}

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

install() {
    local missing=()
    for p in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    if [ ${#missing[@]} -eq 0 ]; then
        say "installed: $(dpkg-query -W -f='${Package} ${Version}  ' "${PACKAGES[@]}")"
        return 0
    fi
    say "installing ${missing[*]} from Debian's packages"
    export DEBIAN_FRONTEND=noninteractive
    # the packages' own services must not start (this script starts the daemons): deny them while installing
    local policy=/usr/sbin/policy-rc.d own_policy=
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy" && own_policy=1
    fi
    local rc=0
    timeout 180 apt-get -q -o DPkg::Lock::Timeout=120 update >"$DIR.apt.log" 2>&1 &&
        timeout 300 apt-get install -y -q -o DPkg::Lock::Timeout=120 --no-install-recommends "${missing[@]}" \
            >>"$DIR.apt.log" 2>&1 || rc=$?
    [ -z "$own_policy" ] || rm -f "$policy"
    if [ "$rc" -ne 0 ]; then
        tail -n 30 "$DIR.apt.log" >&2
        say "apt-get failed (exit $rc); log: $DIR.apt.log"
        return "$rc"
    fi
    say "installed: $(dpkg-query -W -f='${Package} ${Version}  ' "${PACKAGES[@]}")"
}

config() {
    local host cpus
    host=$(hostname -s)
    cpus=$(nproc)
    mkdir -p "$DIR"/state "$DIR"/spool "$DIR"/munge
    cat >"$SLURM_CONF" <<EOF
# written by tests/integration/slurm/cluster.sh
ClusterName=mergebench-test
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/munge/munge.socket
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.daemon.pid
SlurmdPidFile=$DIR/slurmd.daemon.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
SlurmdParameters=config_overrides
SlurmctldTimeout=30
SlurmdTimeout=60
InactiveLimit=0
KillWait=5
MinJobAge=900
MailProg=/bin/true
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
    # a fresh munge key of our own: the daemons and clients here share it, /etc/munge is left alone
    if [ ! -s "$DIR/munge/munge.key" ]; then
        dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
    fi
    chmod 700 "$DIR" "$DIR/munge"
    chmod 400 "$DIR/munge/munge.key"
}

start() {
    stop_daemons quiet   # daemons a killed earlier run left behind (recorded pids only)
    rm -rf "$DIR"/state "$DIR"/spool "$DIR"/*.log "$DIR"/munge/*.log
    config
    local host
    host=$(hostname -s)
    # each daemon in its own session (setsid, which here does not fork: $! is the daemon's pid), so that a
    # signal to the test's process group (Ctrl-C, make's timeout) leaves them to `stop`, which cancels the
    # jobs first
    setsid munged --foreground --force --key-file="$DIR/munge/munge.key" --socket="$DIR/munge/munge.socket" \
        --pid-file="$DIR/munge/munged.daemon.pid" --log-file="$DIR/munge/munged.log" \
        --seed-file="$DIR/munge/munged.seed" </dev/null >"$DIR/munged.out" 2>&1 &
    echo $! >"$DIR/munged.pid"
    wait_for 20 "munged's socket" test -S "$DIR/munge/munge.socket" || { logs; return 1; }
    setsid slurmctld -D -i -f "$SLURM_CONF" </dev/null >"$DIR/slurmctld.out" 2>&1 &
    echo $! >"$DIR/slurmctld.pid"
    setsid slurmd -D -N "$host" -f "$SLURM_CONF" </dev/null >"$DIR/slurmd.out" 2>&1 &
    echo $! >"$DIR/slurmd.pid"
    # bounded: the controller answers, then the node registers and is idle
    wait_for 60 "slurmctld to answer" scontrol ping || { logs; return 1; }
    wait_for 60 "node $host to be idle" node_idle "$host" || { sinfo -N -l >&2 || true; logs; return 1; }
    say "up: $(sinfo -h -o '%P %a %D %T %C') (pids: munged $(cat "$DIR/munged.pid"), slurmctld" \
        "$(cat "$DIR/slurmctld.pid"), slurmd $(cat "$DIR/slurmd.pid"); SLURM_CONF=$SLURM_CONF)"
}

node_idle() { sinfo -h -n "$1" -o %T | grep -qx idle; }

stop_daemons() {
    local quiet=${1:-}
    for d in slurmd slurmctld munged; do
        if alive "$DIR/$d.pid"; then
            local pid t=0
            pid=$(cat "$DIR/$d.pid")
            kill -TERM "$pid" 2>/dev/null || true
            while kill -0 "$pid" 2>/dev/null && [ $t -lt 10 ]; do sleep 0.5; t=$((t + 1)); done
            if kill -0 "$pid" 2>/dev/null; then kill -KILL "$pid" 2>/dev/null || true; fi
            [ -n "$quiet" ] || say "stopped $d (pid $pid)"
        fi
        rm -f "$DIR/$d.pid"
    done
}

stop() {
    if alive "$DIR/slurmctld.pid"; then
        # the jobs first, so that no job step outlives the daemons (bounded waits)
        timeout 10 scancel --full --quiet --partition=debug 2>/dev/null || true
        if ! wait_for 15 "the jobs to end" queue_empty && alive "$DIR/slurmd.pid"; then
            # still there: the job steps' processes, by the pids slurmd tracks for them
            local pids
            pids=$(timeout 10 scontrol listpids 2>/dev/null | awk 'NR > 1 && $1 ~ /^[0-9]+$/ {print $1}') || true
            [ -z "$pids" ] || kill -KILL $pids 2>/dev/null || true
        fi
    fi
    stop_daemons
}

queue_empty() { [ -z "$(squeue -h -o %i 2>/dev/null)" ]; }

logs() {
    # each daemon's log file, or what it printed when it did not get as far as opening one
    local log out f
    for pair in munge/munged.log:munged.out slurmctld.log:slurmctld.out slurmd.log:slurmd.out; do
        log=$DIR/${pair%%:*} out=$DIR/${pair##*:}
        f=$log
        [ -s "$f" ] || f=$out
        [ -s "$f" ] || continue
        echo "----- $f (last 60 lines)" >&2
        tail -n 60 "$f" >&2
    done
}

case "${1:-}" in
    install) install ;;
    start) start ;;
    stop) stop ;;
    logs) logs ;;
    env) echo "export SLURM_CONF=$SLURM_CONF" ;;
    *) echo "usage: $0 install|start|stop|logs|env" >&2; exit 2 ;;
esac
