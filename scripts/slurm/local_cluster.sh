#!/usr/bin/env bash
# A single-node Slurm cluster on this machine, for tests/e2e/test_slurm.py and the Slurm
# tests of the NeMo and Bridge front-ends (tests/nemo/test_slurm_nemo.py,
# tests/bridge/test_slurm_bridge.py: `make test-slurm-entries`).
#
#   bash scripts/slurm/local_cluster.sh start    # install (if missing), configure, start
#   bash scripts/slurm/local_cluster.sh stop     # stop slurmd, slurmctld, slurmdbd, the
#                                                # database and munged
#   bash scripts/slurm/local_cluster.sh status   # exit 0 when sinfo answers and the node is up
#
# Needs root and Debian's packages (apt-get install slurmctld slurmd slurm-client munge
# slurmdbd mariadb-server). The node is this host (`hostname -s`) at 127.0.0.1 with all its
# CPUs, in one partition `debug`. Process tracking is linuxproc and there is no task plugin,
# so no cgroups are needed (containers, CI VMs). Slurm runs as root (SlurmUser=root): a
# throwaway cluster, not a model for a shared one. Job accounting is on, as on a real
# cluster: slurmdbd over a MariaDB server of its own (datadir $NCL_SLURM_DIR/mysql, TCP on
# 127.0.0.1:$NCL_SLURM_DB_PORT, default 16819), so `sacct` answers; NeMo-Run's Slurm
# executor follows its jobs with sacct (and cancels a job whose state it cannot read 30
# times in a row: "Slurm accounting storage is disabled" without it). State and logs live
# under $NCL_SLURM_DIR (/var/lib/ncl-slurm); the configs are written to
# /etc/slurm/slurm.conf and /etc/slurm/slurmdbd.conf only when missing or written by this
# script (marker line), so a real cluster's are never touched. Daemons that run with an
# older configuration of this script are restarted.
set -euo pipefail

DIR=${NCL_SLURM_DIR:-/var/lib/ncl-slurm}
CONF=/etc/slurm/slurm.conf
DBD_CONF=/etc/slurm/slurmdbd.conf
DB_PORT=${NCL_SLURM_DB_PORT:-16819}
MARKER="# written by nemo_checkpointless scripts/slurm/local_cluster.sh"

log() { printf '[local_cluster] %s\n' "$*" >&2; }

need_root() {
    if [[ $(id -u) -ne 0 ]]; then
        log "run as root (it installs packages and starts daemons)"
        exit 1
    fi
}

install() {
    local cmd missing=0
    for cmd in slurmctld slurmd sbatch sacct munged slurmdbd mariadbd mariadb-install-db; do
        command -v "$cmd" >/dev/null || missing=1
    done
    ((missing)) || return 0
    log "installing slurmctld slurmd slurm-client munge slurmdbd mariadb-server (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge \
        slurmdbd mariadb-server >/dev/null
}

# replace $2 with $1 unless equal; conf_changed=1 when replaced (the daemons restart)
conf_changed=0
put_conf() {
    if cmp -s "$1" "$2"; then
        rm -f "$1"
        return 1
    fi
    mv "$1" "$2"
    conf_changed=1
}

write_conf() {
    if [[ -f $CONF ]] && ! grep -qF "$MARKER" "$CONF"; then
        log "$CONF exists and was not written by this script: using it as it is"
        return
    fi
    local host cpus mem new
    host=$(hostname -s)
    cpus=$(getconf _NPROCESSORS_ONLN) # not nproc: it honours OMP_NUM_THREADS
    mem=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
    mkdir -p /etc/slurm "$DIR/ctld" "$DIR/d" "$DIR/log"
    new=$(mktemp)
    cat >"$new" <<EOF
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
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=6819
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
    chmod 0644 "$new"
    put_conf "$new" "$CONF" && log "wrote $CONF (node $host, $cpus CPUs, $mem MB)"
    return 0
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

# ---------------------------------------------------------------- accounting
# A MariaDB server of this cluster's own (datadir, socket and pid file under $DIR; none of
# the host's my.cnf), with one database and one user for slurmdbd. The user's password is
# made once and kept in slurmdbd.conf (root only, mode 0600).
DB_DIR=$DIR/mysql
DB_RUN=$DIR/mysql-run
DB_PID=$DB_RUN/mariadb.pid
DB_SOCK=$DB_RUN/mariadb.sock

sql() { mariadb --no-defaults --socket="$DB_SOCK" -u root "$@"; }

start_db() {
    if alive "$DB_PID"; then
        return
    fi
    mkdir -p "$DB_RUN" "$DIR/log"
    chown mysql:mysql "$DB_RUN"
    if [[ ! -d $DB_DIR/mysql ]]; then
        mkdir -p "$DB_DIR"
        chown mysql:mysql "$DB_DIR"
        mariadb-install-db --no-defaults --user=mysql --datadir="$DB_DIR" --skip-test-db \
            --auth-root-authentication-method=socket >"$DIR/log/mariadb-install.log" 2>&1 || {
            log "mariadb-install-db failed; log: $DIR/log/mariadb-install.log"
            return 1
        }
    fi
    touch "$DIR/log/mariadb.log"
    chown mysql:mysql "$DIR/log/mariadb.log"
    setsid -f mariadbd --no-defaults --user=mysql --datadir="$DB_DIR" --socket="$DB_SOCK" \
        --pid-file="$DB_PID" --bind-address=127.0.0.1 --port="$DB_PORT" --skip-name-resolve \
        --log-error="$DIR/log/mariadb.log" --innodb-buffer-pool-size=64M \
        </dev/null >/dev/null 2>&1
    local i
    for ((i = 0; i < 120; i++)); do
        sql -e 'select 1' >/dev/null 2>&1 && return 0
        sleep 0.5
    done
    log "the database did not come up; log: $DIR/log/mariadb.log"
    return 1
}

write_dbd_conf() {
    if [[ -f $DBD_CONF ]] && ! grep -qF "$MARKER" "$DBD_CONF"; then
        log "$DBD_CONF exists and was not written by this script: using it as it is"
        return
    fi
    local pass new
    pass=$(sed -n 's/^StoragePass=//p' "$DBD_CONF" 2>/dev/null || true)
    [[ -n $pass ]] || pass=$(od -An -N12 -tx1 /dev/urandom | tr -d ' \n')
    sql <<SQL
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$pass';
ALTER USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$pass';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
SQL
    new=$(mktemp)
    chmod 0600 "$new"
    cat >"$new" <<EOF
$MARKER
AuthType=auth/munge
DbdHost=$(hostname -s)
DbdAddr=127.0.0.1
DbdPort=6819
SlurmUser=root
PidFile=$DIR/slurmdbd.pid
LogFile=$DIR/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$pass
StorageLoc=slurm_acct_db
EOF
    put_conf "$new" "$DBD_CONF" || true
}

start_dbd() {
    alive "$DIR/slurmdbd.pid" || slurmdbd
    local i
    for ((i = 0; i < 120; i++)); do # answers once its tables exist (the first start makes them)
        sacctmgr -n list cluster >/dev/null 2>&1 && return 0
        sleep 0.5
    done
    log "slurmdbd did not answer; log: $DIR/log/slurmdbd.log"
    return 1
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

# stop the daemons of these pid files and wait until they are gone (only what this script
# started: by pid file, never by name)
stop_daemons() {
    local file pid i
    for file in "$@"; do
        alive "$file" || continue
        pid=$(cat "$file")
        kill "$pid"
        for ((i = 0; i < 100; i++)); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
    done
}

start() {
    need_root
    install
    write_conf
    start_munge
    mkdir -p "$DIR/ctld" "$DIR/d" "$DIR/log"
    start_db
    write_dbd_conf
    if ((conf_changed)); then
        stop_daemons "$DIR/slurmd.pid" "$DIR/slurmctld.pid" "$DIR/slurmdbd.pid"
    fi
    start_dbd
    # the cluster's row in the accounting database, before slurmctld registers with it
    if ! sacctmgr -n -P list cluster format=cluster | grep -qx ncl-local; then
        sacctmgr -i add cluster ncl-local >/dev/null
    fi
    alive "$DIR/slurmctld.pid" || slurmctld
    alive "$DIR/slurmd.pid" || slurmd
    wait_ready
    # a node left DOWN by an earlier run (e.g. killed daemons) comes back
    scontrol update nodename="$(hostname -s)" state=resume 2>/dev/null || true
    log "up: $(sinfo -h -o '%P %D %T %c CPUs'); accounting: slurmdbd (sacct)"
}

stop() {
    need_root
    stop_daemons "$DIR/slurmd.pid" "$DIR/slurmctld.pid" "$DIR/slurmdbd.pid" "$DB_PID" \
        "$MUNGE_PID"
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
