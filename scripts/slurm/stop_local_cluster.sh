#!/usr/bin/env bash
# Stops the one-node cluster that start_local_cluster.sh started: slurmd, slurmctld, slurmdbd,
# mariadbd, then munged (by their pid files). Running jobs are killed with slurmd. The config, state and logs
# stay (start_local_cluster.sh reuses them).
set -uo pipefail

stop() {  # name pidfile
    local name=$1 pidfile=$2 pid
    if [ -f "$pidfile" ] && pid=$(cat "$pidfile") && kill -0 "$pid" 2>/dev/null; then
        kill "$pid"
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        if kill -0 "$pid" 2>/dev/null; then kill -9 "$pid" 2>/dev/null; fi
        echo "stop_local_cluster: stopped $name (pid $pid)"
    else
        echo "stop_local_cluster: $name is not running"
    fi
    rm -f "$pidfile"
}

[ "$(id -u)" = 0 ] || { echo "stop_local_cluster: error: run as root" >&2; exit 1; }
stop slurmd /run/slurmd.pid
stop slurmctld /run/slurmctld.pid
stop slurmdbd /run/slurmdbd.pid
stop mariadbd /run/mysqld/mysqld.pid
stop munged /run/munge/munged.pid
