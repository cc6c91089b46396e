#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, from Debian's packages (slurm-wlm, munge), for `saekit sweep
# hydra/launcher=slurm` and the `slurm`-marked tests. Runs as root (apt-get, daemons); no systemd needed: the
# daemons are started directly. Safe to run again: a cluster that is up with the same config is left alone.
#
#   scripts/slurm/start_local_cluster.sh          # exit 0 once `sinfo` shows the node ready
#   scripts/slurm/stop_local_cluster.sh           # stops slurmd, slurmctld and munged
#
# Environment: SLURM_PARTITION (default debug), SLURM_START_TIMEOUT_S (default 60),
# SLURM_MEM_HEADROOM_MB (memory kept back from the node for the OS, default 10% of RAM, at least 1024),
# SLURM_ACCOUNTING (default 1: slurmdbd on a local MariaDB, so `sacct` works; 0: no accounting).
# The node is named after `hostname -s`, with `nproc` CPUs and the RAM in /proc/meminfo less the headroom.
# Accounting matters to submitit (hydra/launcher=slurm): it asks `sacct` whether a job ended, and without it a
# job killed before writing its result (timeout, out of memory, scancel) leaves the sweep waiting forever.
# Completed jobs are also listed in /var/log/slurm/jobcomp.log; all daemon logs are in /var/log/slurm.
set -euo pipefail

PARTITION=${SLURM_PARTITION:-debug}
TIMEOUT_S=${SLURM_START_TIMEOUT_S:-60}
ACCOUNTING=${SLURM_ACCOUNTING:-1}
CLUSTER=saekit-local
CONF_DIR=/etc/slurm            # where Debian's slurm-wlm (22.05) reads slurm.conf by default
CONF=$CONF_DIR/slurm.conf
LOG_DIR=/var/log/slurm
CTLD_STATE=/var/spool/slurmctld
SLURMD_SPOOL=/var/spool/slurmd

say() { echo "start_local_cluster: $*"; }
die() { echo "start_local_cluster: error: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (it installs packages, writes $CONF and starts slurmctld, slurmd and munged)"

# ---- packages ----------------------------------------------------------------------------------------
PACKAGES="slurm-wlm munge"
[ "$ACCOUNTING" = 0 ] || PACKAGES="$PACKAGES slurmdbd mariadb-server"
missing=0
for binary in slurmctld slurmd munged; do command -v $binary >/dev/null || missing=1; done
if [ "$ACCOUNTING" != 0 ]; then for binary in slurmdbd mariadbd; do command -v $binary >/dev/null || missing=1; done; fi
if [ $missing = 1 ]; then
    say "installing $PACKAGES with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    # shellcheck disable=SC2086
    apt-get install -y -q $PACKAGES >/dev/null 2>&1 || {
        apt-get update -q >/dev/null && apt-get install -y -q $PACKAGES >/dev/null; } \
        || die "apt-get install -y $PACKAGES failed"
fi

# ---- this machine ------------------------------------------------------------------------------------
NODE=$(hostname -s)
CPUS=$(nproc)
MEM_MB=$(( $(awk '/^MemTotal:/ {print $2}' /proc/meminfo) / 1024 ))
HEADROOM_MB=${SLURM_MEM_HEADROOM_MB:-$(( MEM_MB / 10 > 1024 ? MEM_MB / 10 : 1024 ))}
REAL_MB=$(( MEM_MB - HEADROOM_MB ))
[ "$REAL_MB" -gt 512 ] || die "only ${MEM_MB} MB of RAM; too little for a node after ${HEADROOM_MB} MB of headroom"
# slurmctld and slurmd must reach each other by this name; a name that does not resolve is this machine.
ADDR=$(getent hosts "$NODE" | awk '{print $1; exit}')
[ -n "$ADDR" ] || ADDR=127.0.0.1

NEW_CONF=$(cat <<EOF
# Written by scripts/slurm/start_local_cluster.sh: a one-node cluster on $NODE (rerun the script to rewrite it).
ClusterName=$CLUSTER
SlurmctldHost=$NODE($ADDR)
SlurmUser=slurm
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
ReturnToService=2
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$CTLD_STATE
SlurmdSpoolDir=$SLURMD_SPOOL
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
DefMemPerCPU=$(( REAL_MB / CPUS ))
AccountingStorageType=$([ "$ACCOUNTING" = 0 ] && echo accounting_storage/none || echo accounting_storage/slurmdbd)
AccountingStorageHost=localhost
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=$LOG_DIR/jobcomp.log
MinJobAge=600
InactiveLimit=0
KillWait=30
Waittime=0
SlurmctldTimeout=120
SlurmdTimeout=300
NodeName=$NODE NodeAddr=$ADDR CPUs=$CPUS RealMemory=$REAL_MB State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
)

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
node_state() { sinfo -h -N -n "$NODE" -o %T 2>/dev/null | head -1; }
ready() { case "$(node_state)" in idle|mixed|allocated|completing|idle\*) return 0 ;; *) return 1 ;; esac; }

print_stop() { say "stop it with: $(dirname "$(readlink -f "$0")")/stop_local_cluster.sh"; }

dbd_up() { [ "$ACCOUNTING" = 0 ] || { alive /run/mysqld/mysqld.pid && alive /run/slurmdbd.pid; }; }

if [ -f "$CONF" ] && [ "$(cat "$CONF")" = "$NEW_CONF" ] && alive /run/munge/munged.pid && dbd_up \
        && alive /run/slurmctld.pid && alive /run/slurmd.pid && ready; then
    say "already up: node $NODE ($CPUS CPUs, ${REAL_MB} MB) in partition $PARTITION"
    print_stop
    exit 0
fi

# ---- munge -------------------------------------------------------------------------------------------
mkdir -p /run/munge /var/log/munge /var/lib/munge /etc/munge
chown munge:munge /run/munge /var/log/munge /var/lib/munge /etc/munge
chmod 0755 /run/munge
if [ ! -s /etc/munge/munge.key ]; then
    say "creating /etc/munge/munge.key"
    if command -v mungekey >/dev/null; then
        mungekey --create --keyfile=/etc/munge/munge.key
    else
        dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null
    fi
fi
chown munge:munge /etc/munge/munge.key
chmod 0400 /etc/munge/munge.key
if ! alive /run/munge/munged.pid; then
    rm -f /run/munge/munged.pid /run/munge/munge.socket.2 /run/munge/munge.socket.2.lock
    runuser -u munge -- /usr/sbin/munged || die "munged did not start (see /var/log/munge/munged.log)"
fi
for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
munge -n | unmunge >/dev/null || die "munge does not answer (see /var/log/munge/munged.log)"

# ---- slurm config and daemons ------------------------------------------------------------------------
mkdir -p "$CONF_DIR" "$LOG_DIR" "$CTLD_STATE" "$SLURMD_SPOOL"
chown slurm:slurm "$LOG_DIR" "$CTLD_STATE"
chmod 0755 "$LOG_DIR" "$SLURMD_SPOOL"

# ---- accounting: MariaDB and slurmdbd (what `sacct` reads) -------------------------------------------
if [ "$ACCOUNTING" != 0 ]; then
    if ! alive /run/mysqld/mysqld.pid; then
        say "starting mariadbd"
        mkdir -p /run/mysqld && chown mysql:mysql /run/mysqld
        [ -d /var/lib/mysql/mysql ] || mariadb-install-db --user=mysql --datadir=/var/lib/mysql >/dev/null \
            || die "mariadb-install-db failed"
        nohup /usr/sbin/mariadbd --user=mysql --pid-file=/run/mysqld/mysqld.pid --skip-networking=0 \
            --bind-address=127.0.0.1 >>"$LOG_DIR/mariadbd.log" 2>&1 &
    fi
    for _ in $(seq 300); do mariadb -e 'SELECT 1' >/dev/null 2>&1 && break; sleep 0.1; done
    mariadb -e 'SELECT 1' >/dev/null 2>&1 || die "mariadbd does not answer; last lines of $LOG_DIR/mariadbd.log:
$(tail -n 15 "$LOG_DIR/mariadbd.log" 2>/dev/null)"
    [ -s "$CONF_DIR/.dbpass" ] || { head -c 18 /dev/urandom | base64 | tr -d '/+=' > "$CONF_DIR/.dbpass"; chmod 0600 "$CONF_DIR/.dbpass"; }
    DBPASS=$(cat "$CONF_DIR/.dbpass")
    mariadb -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
        CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DBPASS';
        ALTER USER 'slurm'@'localhost' IDENTIFIED BY '$DBPASS';
        GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';" || die "could not create the accounting database"
    DBD_CONF=$(cat <<EOF
# Written by scripts/slurm/start_local_cluster.sh
AuthType=auth/munge
DbdHost=localhost
DbdPort=6819
SlurmUser=slurm
LogFile=$LOG_DIR/slurmdbd.log
PidFile=/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=$DBPASS
StorageLoc=slurm_acct_db
EOF
)
    if [ ! -f "$CONF_DIR/slurmdbd.conf" ] || [ "$(cat "$CONF_DIR/slurmdbd.conf")" != "$DBD_CONF" ]; then
        printf '%s\n' "$DBD_CONF" > "$CONF_DIR/slurmdbd.conf"
        if alive /run/slurmdbd.pid; then kill "$(cat /run/slurmdbd.pid)"; sleep 1; fi
    fi
    chown slurm:slurm "$CONF_DIR/slurmdbd.conf"
    chmod 0600 "$CONF_DIR/slurmdbd.conf"
    if ! alive /run/slurmdbd.pid; then
        say "starting slurmdbd"
        /usr/sbin/slurmdbd || die "slurmdbd did not start; last lines of $LOG_DIR/slurmdbd.log:
$(tail -n 20 "$LOG_DIR/slurmdbd.log" 2>/dev/null)"
    fi
fi
if [ ! -f "$CONF" ] || [ "$(cat "$CONF")" != "$NEW_CONF" ]; then
    say "writing $CONF"
    printf '%s\n' "$NEW_CONF" > "$CONF.tmp" && mv "$CONF.tmp" "$CONF"
    # a changed node or partition needs fresh daemons
    for pidfile in /run/slurmd.pid /run/slurmctld.pid; do
        if alive "$pidfile"; then kill "$(cat "$pidfile")"; fi
    done
    for _ in $(seq 100); do alive /run/slurmd.pid || alive /run/slurmctld.pid || break; sleep 0.1; done
fi
if [ "$ACCOUNTING" != 0 ]; then  # sacctmgr reads slurm.conf: the cluster is registered once it names slurmdbd
    for _ in $(seq 100); do sacctmgr -n list cluster >/dev/null 2>&1 && break; sleep 0.2; done
    if ! sacctmgr -n -P list cluster format=cluster 2>/dev/null | grep -qx "$CLUSTER"; then
        sacctmgr -i add cluster "$CLUSTER" >/dev/null || die "sacctmgr could not add cluster $CLUSTER; last lines of $LOG_DIR/slurmdbd.log:
$(tail -n 20 "$LOG_DIR/slurmdbd.log" 2>/dev/null)"
    fi
fi
if ! alive /run/slurmctld.pid; then
    say "starting slurmctld"
    /usr/sbin/slurmctld || die "slurmctld did not start; last lines of $LOG_DIR/slurmctld.log:
$(tail -n 20 "$LOG_DIR/slurmctld.log" 2>/dev/null)"
fi
if ! alive /run/slurmd.pid; then
    say "starting slurmd"
    /usr/sbin/slurmd || die "slurmd did not start; last lines of $LOG_DIR/slurmd.log:
$(tail -n 20 "$LOG_DIR/slurmd.log" 2>/dev/null)"
fi

# ---- wait for the node -------------------------------------------------------------------------------
deadline=$(( $(date +%s) + TIMEOUT_S ))
resumed=0
until ready; do
    state=$(node_state)
    case "$state" in
        down*|drain*)  # left over from an earlier run (e.g. the machine restarted under it)
            if [ $resumed = 0 ]; then scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true; resumed=1; fi ;;
    esac
    if [ "$(date +%s)" -ge "$deadline" ]; then
        die "node $NODE is not ready after ${TIMEOUT_S}s (sinfo state: '${state:-no answer}'); sinfo -R says:
$(sinfo -R 2>&1)
last lines of $LOG_DIR/slurmctld.log:
$(tail -n 15 "$LOG_DIR/slurmctld.log" 2>/dev/null)
last lines of $LOG_DIR/slurmd.log:
$(tail -n 15 "$LOG_DIR/slurmd.log" 2>/dev/null)"
    fi
    sleep 0.5
done
say "up: node $NODE ($CPUS CPUs, ${REAL_MB} MB) in partition $PARTITION; config $CONF, logs $LOG_DIR"
print_stop
