#!/usr/bin/env bash
# A one-node Slurm cluster (Slurm 22.05 from Debian's packages, with job accounting) on this
# machine, for the `slurm` tests (tests/test_slurm.py) and for trying `hydra/launcher=slurm`.
#
#   scripts/slurm_cluster.sh up      install (apt) + start munge, MariaDB, slurmdbd, slurmctld, slurmd
#   scripts/slurm_cluster.sh down    stop the daemons started by `up` (by their pid files)
#   scripts/slurm_cluster.sh status  sinfo
#
# Exit codes: 0 = cluster up (or down), 1 = it did not come up (logs under the state folder),
# 77 = skipped: not a Debian machine, not root, or no systemd-free way to run the daemons here.
# Needs: Debian (apt-get), root. Writes /etc/slurm/slurm.conf and /etc/slurm/slurmdbd.conf (so that
# sbatch/squeue/sacct need no SLURM_CONF) and keeps state, spool and logs in $SLURM_STATE_DIR
# (default /var/tmp/cl-runner-slurm). One node with all this machine's CPUs, partition `debug`.
# Accounting (slurmdbd + MariaDB) is not optional: submitit asks sacct for a job's final state.
# In a container there are no cgroups: proctrack/linuxproc and task/none.
set -uo pipefail

STATE=${SLURM_STATE_DIR:-/var/tmp/cl-runner-slurm}
APT_TIMEOUT=${SLURM_APT_TIMEOUT:-400}  # seconds for apt-get update + install (CI bound)
HOST=$(hostname)
ACTION=${1:-up}

skip() { echo "slurm_cluster: skip: $*" >&2; exit 77; }
fail() { echo "slurm_cluster: error: $*" >&2; for f in "$STATE"/log/*.log; do [ -f "$f" ] && { echo "--- $f" >&2; tail -n 5 "$f" >&2; }; done; exit 1; }
say() { echo "slurm_cluster: $*"; }

cluster_ready() {  # the node answers and is idle or mixed/allocated
    timeout 5 sinfo -h -N -o '%T' 2>/dev/null | grep -qE '^(idle|mixed|allocated|completing)'
}

stop_pidfile() {  # stop_pidfile FILE: TERM the process named in FILE, wait up to 10 s
    local f=$1 pid
    [ -f "$f" ] || return 0
    pid=$(cat "$f" 2>/dev/null) || return 0
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
        kill "$pid"
        for _ in $(seq 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    fi
    rm -f "$f"
}

down() {
    stop_pidfile "$STATE/slurmd.pid"
    stop_pidfile "$STATE/slurmctld.pid"
    stop_pidfile "$STATE/slurmdbd.pid"
    stop_pidfile /run/mysqld/cl-runner.pid
    stop_pidfile /run/munge/munged.pid
    say "stopped"
}

up() {
    [ -f /etc/debian_version ] && command -v apt-get >/dev/null || skip "not a Debian machine (apt-get missing)"
    [ "$(id -u)" = 0 ] || skip "needs root (to install packages and start the daemons)"
    if cluster_ready; then say "already up: $(sinfo -h -o '%P %D %C %T' | head -n 1)"; exit 0; fi

    local pkgs="slurm-wlm munge slurmdbd mariadb-server"
    if ! command -v slurmctld >/dev/null || ! command -v slurmdbd >/dev/null || ! command -v mariadbd >/dev/null; then
        say "installing $pkgs (apt-get, at most ${APT_TIMEOUT}s)"
        export DEBIAN_FRONTEND=noninteractive
        timeout "$APT_TIMEOUT" bash -c "apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends $pkgs >/dev/null" \
            || skip "apt-get could not install $pkgs within ${APT_TIMEOUT}s (no Debian mirror?)"
    fi

    mkdir -p "$STATE"/{ctld,d,log} /run/munge /run/mysqld /etc/slurm
    chown slurm:slurm "$STATE" "$STATE"/ctld "$STATE"/log
    chown munge:munge /run/munge && chown mysql:mysql /run/mysqld

    # munge: the package made a key; start the daemon as its user
    [ -s /etc/munge/munge.key ] || { /usr/sbin/mungekey --create >/dev/null 2>&1 || dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=128 2>/dev/null; chown munge:munge /etc/munge/munge.key; chmod 600 /etc/munge/munge.key; }
    if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        runuser -u munge -- /usr/sbin/munged || fail "munged did not start"
    fi

    # MariaDB for slurmdbd (the package initialized /var/lib/mysql)
    if ! mariadb-admin ping >/dev/null 2>&1; then
        [ -d /var/lib/mysql/mysql ] || mariadb-install-db --user=mysql >/dev/null 2>&1
        (setsid mariadbd --user=mysql --pid-file=/run/mysqld/cl-runner.pid --log-error=/run/mysqld/cl-runner.log </dev/null >/dev/null 2>&1 &)
        for _ in $(seq 60); do mariadb-admin ping >/dev/null 2>&1 && break; sleep 0.5; done
        mariadb-admin ping >/dev/null 2>&1 || { tail -n 5 /run/mysqld/cl-runner.log >&2; fail "MariaDB did not start"; }
    fi
    mariadb -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db; CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurmpw';
                GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;" || fail "could not create the accounting database"

    # configuration (the files checked in ../shared/slurm, with this machine's host name and CPUs)
    local cpus mem
    cpus=$(nproc)
    mem=$(awk '/MemTotal/ {printf "%d", $2 / 1024 * 0.8}' /proc/meminfo)
    cat >/etc/slurm/slurmdbd.conf <<EOF
AuthType=auth/munge
DbdHost=localhost
DbdPort=6819
SlurmUser=slurm
LogFile=$STATE/log/slurmdbd.log
PidFile=$STATE/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=slurmpw
StorageLoc=slurm_acct_db
EOF
    chown slurm:slurm /etc/slurm/slurmdbd.conf && chmod 600 /etc/slurm/slurmdbd.conf
    cat >/etc/slurm/slurm.conf <<EOF
ClusterName=testcluster
SlurmctldHost=$HOST
SlurmUser=slurm
SlurmdUser=root
AuthType=auth/munge
# a requeued job waits cred_expire seconds before it may start again (default 120): 30 keeps the
# requeue test short
AuthInfo=cred_expire=30
CryptoType=crypto/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=6819
JobCompType=jobcomp/filetxt
JobCompLoc=$STATE/log/jobcomp.txt
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=5
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
SlurmctldPort=6817
SlurmdPort=6818
MaxArraySize=1001
KillWait=30
InactiveLimit=0
MinJobAge=300
Waittime=0
NodeName=$HOST CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF

    [ -f "$STATE/slurmdbd.pid" ] && kill -0 "$(cat "$STATE/slurmdbd.pid")" 2>/dev/null || /usr/sbin/slurmdbd || fail "slurmdbd did not start"
    for _ in $(seq 120); do sacctmgr -n list cluster >/dev/null 2>&1 && break; sleep 0.5; done
    sacctmgr -n -P list cluster format=cluster 2>/dev/null | grep -qw testcluster || sacctmgr -i add cluster testcluster >/dev/null \
        || fail "sacctmgr could not register the cluster"
    [ -f "$STATE/slurmctld.pid" ] && kill -0 "$(cat "$STATE/slurmctld.pid")" 2>/dev/null || /usr/sbin/slurmctld || fail "slurmctld did not start"
    [ -f "$STATE/slurmd.pid" ] && kill -0 "$(cat "$STATE/slurmd.pid")" 2>/dev/null || /usr/sbin/slurmd || fail "slurmd did not start"
    for _ in $(seq 60); do cluster_ready && break; sleep 0.5; done
    cluster_ready || fail "the node did not become idle: $(sinfo -h -N -o '%N %T %E' 2>&1)"
    timeout 30 srun -t 1 hostname >/dev/null || fail "srun hostname failed"
    say "up: $(sinfo -h -o 'partition %P, %D node, CPUs (allocated/idle/other/total) %C, %T')"
}

case "$ACTION" in
    up) up ;;
    down) down ;;
    status) sinfo ;;
    *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
