#!/usr/bin/env bash
# A one-node SLURM cluster on localhost (munge, MariaDB, slurmdbd, slurmctld, slurmd) for trying gridlab's
# slurm executor on a laptop or in CI. Needs root and: apt-get install slurm-wlm slurmdbd munge mariadb-server.
#
#   scripts/slurm-local.sh start    # idempotent; prints the SLURM_CONF to export
#   scripts/slurm-local.sh status
#   scripts/slurm-local.sh stop     # stops every daemon by its pid file
#
# Everything (configs, state, logs, database) lives under $GRIDLAB_SLURM_DIR (default: <repo>/.slurm).
set -euo pipefail

REPO="$(cd "$(dirname "$0")/.." && pwd)"
DIR="${GRIDLAB_SLURM_DIR:-$REPO/.slurm}"
CPUS="${GRIDLAB_SLURM_CPUS:-2}"
DB_PORT=3307
DB_PASS=gridlab-slurm
export SLURM_CONF="$DIR/slurm.conf"

log() { echo "slurm-local: $*" >&2; }

pid_alive() {  # pid_alive PIDFILE
    [[ -s "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
    local seconds=$1 what=$2; shift 2
    for _ in $(seq $((seconds * 5))); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 0.2
    done
    log "timed out waiting for $what"; return 1
}

write_configs() {
    mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log" "$DIR/mysql"
    local mem_mb
    # Leave the OS a quarter of the memory; jobs ask for what they need within this.
    mem_mb=$(awk '/MemTotal/ {print int($2 / 1024 * 0.75)}' /proc/meminfo)
    cat > "$DIR/slurm.conf" <<CONF
# Written by scripts/slurm-local.sh
ClusterName=gridlab
SlurmctldHost=localhost
SlurmUser=root
SlurmctldPort=6817
SlurmdPort=6818
AuthType=auth/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_min_interval=100000
DependencyParameters=kill_invalid_depend
KillWait=5
MinJobAge=600
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobRequeue=1
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$mem_mb State=UNKNOWN
PartitionName=local Nodes=localhost Default=YES MaxTime=INFINITE State=UP
CONF
    cat > "$DIR/slurmdbd.conf" <<CONF
# Written by scripts/slurm-local.sh
AuthType=auth/munge
DbdHost=localhost
DbdPort=6819
SlurmUser=root
PidFile=$DIR/slurmdbd.pid
LogFile=$DIR/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
CONF
    chmod 600 "$DIR/slurmdbd.conf"
}

start_munge() {
    if pgrep -x munged >/dev/null; then return; fi
    if [[ ! -s /etc/munge/munge.key ]]; then
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
    chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    runuser -u munge -- /usr/sbin/munged
    wait_for 10 munged bash -c 'munge -n | unmunge'
}

mysql_cli() { mysql --protocol=socket --socket="$DIR/mysql/mysqld.sock" -uroot "$@"; }

start_mariadb() {
    if pid_alive "$DIR/mysql/mysqld.pid"; then return; fi
    chown -R mysql:mysql "$DIR/mysql"
    if [[ ! -d "$DIR/mysql/data/mysql" ]]; then
        mysql_install_db --user=mysql --datadir="$DIR/mysql/data" --auth-root-authentication-method=socket \
            >"$DIR/log/mysql_install_db.log" 2>&1
    fi
    # The mysql user must be able to write the log and pid files, or mysqld dies silently.
    runuser -u mysql -- /usr/sbin/mysqld --datadir="$DIR/mysql/data" --socket="$DIR/mysql/mysqld.sock" \
        --pid-file="$DIR/mysql/mysqld.pid" --log-error="$DIR/mysql/mysqld.log" \
        --port=$DB_PORT --bind-address=127.0.0.1 --innodb-buffer-pool-size=64M >/dev/null 2>&1 &
    wait_for 30 mariadb mysql_cli -e 'SELECT 1'
    mysql_cli -e "CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
                  CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
                  GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
                  GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"
}

start_slurm() {
    if ! pid_alive "$DIR/slurmdbd.pid"; then
        /usr/sbin/slurmdbd
        wait_for 30 slurmdbd sacctmgr -n list cluster
    fi
    if ! sacctmgr -n -P list cluster format=cluster | grep -qx gridlab; then
        sacctmgr -i add cluster gridlab >/dev/null
    fi
    if ! pid_alive "$DIR/slurmctld.pid"; then
        # Without a live slurmd (a reboot, a new machine with this folder), the saved jobs have no processes left:
        # restored, the dead "running" ones would hold the node forever. -c starts the controller without them.
        if pid_alive "$DIR/slurmd.pid"; then /usr/sbin/slurmctld; else /usr/sbin/slurmctld -c; fi
        wait_for 30 slurmctld scontrol ping
    fi
    if ! pid_alive "$DIR/slurmd.pid"; then
        /usr/sbin/slurmd -N localhost
    fi
    wait_for 30 "node localhost idle" bash -c "sinfo -h -N -o %T | grep -Eq '^(idle|mixed|allocated)'"
}

stop_pidfile() {  # stop_pidfile PIDFILE NAME
    if pid_alive "$1"; then
        local pid; pid=$(cat "$1")
        kill "$pid"
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
        log "stopped $2 ($pid)"
    fi
    rm -f "$1"
}

case "${1:-}" in
    start)
        write_configs
        start_munge
        start_mariadb
        start_slurm
        # Clients find the cluster without SLURM_CONF when there is no system-wide configuration.
        if [[ ! -e /etc/slurm/slurm.conf && -w /etc/slurm ]]; then ln -s "$DIR/slurm.conf" /etc/slurm/slurm.conf; fi
        log "up: export SLURM_CONF=$SLURM_CONF"
        ;;
    stop)
        stop_pidfile "$DIR/slurmd.pid" slurmd
        stop_pidfile "$DIR/slurmctld.pid" slurmctld
        stop_pidfile "$DIR/slurmdbd.pid" slurmdbd
        stop_pidfile "$DIR/mysql/mysqld.pid" mariadb
        stop_pidfile /run/munge/munged.pid munged
        if [[ -L /etc/slurm/slurm.conf && "$(readlink /etc/slurm/slurm.conf)" == "$DIR/slurm.conf" ]]; then
            rm -f /etc/slurm/slurm.conf
        fi
        ;;
    status)
        for f in "$DIR/slurmd.pid" "$DIR/slurmctld.pid" "$DIR/slurmdbd.pid" "$DIR/mysql/mysqld.pid" /run/munge/munged.pid; do
            if pid_alive "$f"; then echo "running  $(cat "$f")  $f"; else echo "stopped  -  $f"; fi
        done
        sinfo 2>/dev/null || true
        ;;
    *)
        echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
