#!/usr/bin/env bash
# A single-node Slurm cluster on this machine, for tests/e2e/test_slurm.py.
#
#   bash scripts/slurm/local_cluster.sh start    # install (if missing), configure, start
#   bash scripts/slurm/local_cluster.sh stop     # stop slurmd, slurmctld and munged
#   bash scripts/slurm/local_cluster.sh status   # exit 0 when sinfo answers and the node is up
#
# Needs root and Debian's packages (apt-get install slurmctld slurmd slurm-client munge).
# The node is this host (`hostname -s`) at 127.0.0.1 with all its CPUs, in one partition
# `debug`. Process tracking is linuxproc and there is no task plugin, so no cgroups are
# needed (containers, CI VMs). Slurm runs as root (SlurmUser=root): a throwaway cluster,
# not a model for a shared one. State and logs live under $NCL_SLURM_DIR
# (/var/lib/ncl-slurm); the config is written to /etc/slurm/slurm.conf only when it is
# missing or was written by this script (marker line), so a real cluster's is never touched.
set -euo pipefail

DIR=${NCL_SLURM_DIR:-/var/lib/ncl-slurm}
CONF=/etc/slurm/slurm.conf
MARKER="# written by nemo_checkpointless scripts/slurm/local_cluster.sh"

log() { printf '[local_cluster] %s\n' "$*" >&2; }

need_root() {
    if [[ $(id -u) -ne 0 ]]; then
        log "run as root (it installs packages and starts daemons)"
        exit 1
    fi
}

install() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null &&
        command -v sbatch >/dev/null && command -v munged >/dev/null; then
        return
    fi
    log "installing slurmctld slurmd slurm-client munge (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
}

write_conf() {
    if [[ -f $CONF ]] && ! grep -qF "$MARKER" "$CONF"; then
        log "$CONF exists and was not written by this script: using it as it is"
        return
    fi
    local host cpus mem
    host=$(hostname -s)
    cpus=$(getconf _NPROCESSORS_ONLN) # not nproc: it honours OMP_NUM_THREADS
    mem=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
    mkdir -p /etc/slurm "$DIR/ctld" "$DIR/d" "$DIR/log"
    cat >"$CONF" <<EOF
$MARKER
ClusterName=ncl-local
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$DIR/ctld
SlurmdSpoolDir=$DIR/d
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
MinJobAge=300
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE OverSubscribe=YES State=UP
EOF
    log "wrote $CONF (node $host, $cpus CPUs, $mem MB)"
}

# pid of a daemon from its pid file, if it is alive
alive() {
    local pid
    pid=$(cat "$1" 2>/dev/null) || return 1
    [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null
}

MUNGE_PID=/run/munge/munged.pid

start_munge() {
    if alive "$MUNGE_PID"; then
        return
    fi
    if [[ ! -s /etc/munge/munge.key ]]; then
        if command -v mungekey >/dev/null; then
            mungekey --create --keyfile=/etc/munge/munge.key
        else
            dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
        fi
    fi
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    runuser -u munge -- munged
}

wait_ready() {
    local i
    for ((i = 0; i < 60; i++)); do
        if sinfo -h -o '%T' 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
            return 0
        fi
        sleep 0.5
    done
    log "the node did not come up; logs: $DIR/log/"
    sinfo -N -l >&2 || true
    return 1
}

start() {
    need_root
    install
    write_conf
    start_munge
    mkdir -p "$DIR/ctld" "$DIR/d" "$DIR/log"
    alive "$DIR/slurmctld.pid" || slurmctld
    alive "$DIR/slurmd.pid" || slurmd
    wait_ready
    # a node left DOWN by an earlier run (e.g. killed daemons) comes back
    scontrol update nodename="$(hostname -s)" state=resume 2>/dev/null || true
    log "up: $(sinfo -h -o '%P %D %T %c CPUs')"
}

stop() {
    need_root
    local file
    # only the daemons this script started: by their pid files, never by name
    for file in "$DIR/slurmd.pid" "$DIR/slurmctld.pid" "$MUNGE_PID"; do
        if alive "$file"; then
            kill "$(cat "$file")"
        fi
    done
    log "stopped"
}

status() {
    sinfo -h -o '%P %D %T' 2>/dev/null | grep -qE 'idle|mixed|allocated'
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *)
        echo "usage: $0 start|stop|status" >&2
        exit 2
        ;;
esac
