#!/usr/bin/env bash
# A private single-node SLURM cluster on this machine, for running the workflow through a real
# scheduler in tests and demos.
#
#   tests/slurm/cluster.sh start     write the config, start munged, slurmctld, slurmd; wait for idle
#   tests/slurm/cluster.sh status    show the daemons and the node; exit 0 only when usable
#   tests/slurm/cluster.sh stop      stop the daemons this script started (by their pid files)
#   eval "$(tests/slurm/cluster.sh env)"   point SLURM client commands (sbatch, squeue) at it
#
# Everything lives under $MOEFORGE_SLURM_DIR (default /tmp/moeforge-slurm): slurm.conf, a munge
# key and socket of its own, state, logs and pid files. Clients on the submit side find the cluster
# through $SLURM_CONF and the daemons get the config path on their command line. One global file is
# needed all the same: the Snakemake SLURM job step strips every SLURM_* variable (SLURM_CONF included)
# before its inner `srun`, which then reads /etc/slurm/slurm.conf. So a copy of the config is put
# there, first line marked, only when that file is absent or was written by this script; `stop`
# removes it again. A site's own slurm.conf and munge installation are never touched. Ports
# default to 16817/16818 so that a system slurmctld on the standard ports does not collide.
#
# Every wait is bounded: a broken daemon makes `start` fail with its log tail, never hang.
# Needs root (slurmd launches jobs as their owner) and the Debian packages (tests/slurm/install.sh).
set -euo pipefail

STATE=${MOEFORGE_SLURM_DIR:-/tmp/moeforge-slurm}
CTLD_PORT=${MOEFORGE_SLURM_CTLD_PORT:-16817}
SLURMD_PORT=${MOEFORGE_SLURM_SLURMD_PORT:-16818}
PARTITION=${MOEFORGE_SLURM_PARTITION:-debug}
NODE=localhost
START_TIMEOUT=${MOEFORGE_SLURM_START_TIMEOUT:-60}
STOP_TIMEOUT=${MOEFORGE_SLURM_STOP_TIMEOUT:-20}

CONF=$STATE/etc/slurm.conf
MUNGE_DIR=$STATE/munge
MUNGE_KEY=$STATE/munge-key/munge.key
MUNGE_SOCKET=$MUNGE_DIR/munge.socket.2
MUNGE_PID=$MUNGE_DIR/munged.pid
CTLD_PID=$STATE/run/slurmctld.pid
SLURMD_PID=$STATE/run/slurmd.pid
LOGS=$STATE/log
GLOBAL_CONF=/etc/slurm/slurm.conf
MARK="# written by moeforge tests/slurm/cluster.sh for $STATE"
MARK_PREFIX="# written by moeforge tests/slurm/cluster.sh for "

export PATH=$PATH:/usr/sbin:/sbin
export SLURM_CONF=$CONF

log() { echo "cluster.sh: $*" >&2; }
die() { log "$*"; exit 1; }

# Run a command with a hard time limit so that no client call can hang the caller.
bounded() { timeout -k 2 10 "$@"; }

# True when the pid file names a live process whose executable is the expected daemon; guards
# against a stale pid file whose number was reused by an unrelated process.
alive() {
    local pidfile=$1 name=$2 pid exe
    [[ -s $pidfile ]] || return 1
    pid=$(<"$pidfile")
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    [[ -d /proc/$pid ]] || return 1
    exe=$(readlink "/proc/$pid/exe" 2>/dev/null || true)
    # Debian installs the daemons as alternatives: /usr/sbin/slurmctld -> slurmctld-wlm.
    [[ ${exe##*/} == "$name" || ${exe##*/} == "$name"-wlm ]]
}

node_state() {
    bounded sinfo -h -n "$NODE" -o %t 2>/dev/null | head -n1 || true
}

write_conf() {
    local cpus mem
    cpus=$(nproc)
    # RealMemory in MB, a little below the total so slurmd never reports less than configured.
    mem=$(awk '/^MemTotal:/ {printf "%d", $2 / 1024 * 0.95}' /proc/meminfo)
    mkdir -p "$STATE/etc" "$STATE/ctld" "$STATE/slurmd" "$STATE/run" "$LOGS"
    cat >"$CONF.tmp" <<EOF
$MARK
# A single-node cluster for tests: no cgroups, no accounting daemon, no systemd.
ClusterName=moeforge
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET
CredType=cred/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/slurmd
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURMD_PID
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# A job that asks for no memory gets 1 GB per CPU, not the whole node.
DefMemPerCPU=1000
SlurmdParameters=config_overrides
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
# Without slurmdbd, sacct has nothing to read; finished jobs are appended here instead.
JobCompType=jobcomp/filetxt
JobCompLoc=$LOGS/jobcomp.log
# Keep finished jobs visible to squeue/scontrol for 10 minutes.
MinJobAge=600
ReturnToService=2
SlurmdTimeout=60
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
    mv "$CONF.tmp" "$CONF"
    # Job ids restart at 1 on a fresh cluster: drop the completion records of an earlier one.
    : >"$LOGS/jobcomp.log"
}

# Install the copy of the config that srun inside a job reads (see the header).
install_global_conf() {
    local first owner
    if [[ -e $GLOBAL_CONF ]]; then
        first=$(head -n1 "$GLOBAL_CONF")
        [[ $first == "$MARK_PREFIX"* ]] || die "$GLOBAL_CONF exists and was not written by this script:" \
            "jobs' srun would read it instead of this cluster's config; move it away or use that cluster"
        owner=${first#"$MARK_PREFIX"}
        if [[ $owner != "$STATE" ]] && alive "$owner/run/slurmctld.pid" slurmctld; then
            die "$GLOBAL_CONF belongs to the running cluster in $owner: stop it first"
        fi
    fi
    mkdir -p "$(dirname "$GLOBAL_CONF")"
    cp "$CONF" "$GLOBAL_CONF.moeforge.tmp"
    mv "$GLOBAL_CONF.moeforge.tmp" "$GLOBAL_CONF"
}

remove_global_conf() {
    [[ -f $GLOBAL_CONF ]] && [[ $(head -n1 "$GLOBAL_CONF") == "$MARK" ]] && rm -f "$GLOBAL_CONF"
    return 0
}

start_munge() {
    if alive "$MUNGE_PID" munged; then
        return 0
    fi
    id munge >/dev/null 2>&1 || die "user munge missing: run tests/slurm/install.sh"
    mkdir -p "$MUNGE_DIR" "$(dirname "$MUNGE_KEY")"
    # The key directory is private; the socket directory must be reachable by every job owner.
    chown munge:munge "$MUNGE_DIR" "$(dirname "$MUNGE_KEY")"
    chmod 0755 "$MUNGE_DIR"
    chmod 0700 "$(dirname "$MUNGE_KEY")"
    if [[ ! -s $MUNGE_KEY ]]; then
        mungekey --create --keyfile="$MUNGE_KEY" >/dev/null
        chown munge:munge "$MUNGE_KEY"
        chmod 0400 "$MUNGE_KEY"
    fi
    rm -f "$MUNGE_PID"
    runuser -u munge -- munged \
        --socket="$MUNGE_SOCKET" --key-file="$MUNGE_KEY" --pid-file="$MUNGE_PID" \
        --log-file="$MUNGE_DIR/munged.log" --seed-file="$MUNGE_DIR/munged.seed" \
        || die "munged failed to start: $(tail -n 5 "$MUNGE_DIR/munged.log" 2>/dev/null)"
    wait_for "munged" 10 alive "$MUNGE_PID" munged
}

# wait_for WHAT SECONDS COMMAND...: poll COMMAND every 0.2 s, fail after SECONDS.
wait_for() {
    local what=$1 seconds=$2 deadline
    shift 2
    deadline=$((SECONDS + seconds))
    until "$@"; do
        if ((SECONDS >= deadline)); then
            log "$what not ready after ${seconds}s"
            return 1
        fi
        sleep 0.2
    done
}

node_idle() {
    local state
    state=$(node_state)
    [[ $state == idle || $state == mix || $state == alloc ]]
}

show_logs() {
    local f
    for f in "$MUNGE_DIR/munged.log" "$LOGS/slurmctld.log" "$LOGS/slurmd.log"; do
        [[ -f $f ]] && { echo "--- $f" >&2; tail -n 15 "$f" >&2; }
    done
    return 0
}

cmd_start() {
    [[ $(id -u) -eq 0 ]] || die "must run as root (slurmd starts jobs as their owner)"
    command -v slurmctld >/dev/null || die "slurmctld not found: run tests/slurm/install.sh"
    mkdir -p "$STATE"
    # Rewrite the config only while no daemon of ours is running on the old one.
    if ! alive "$CTLD_PID" slurmctld && ! alive "$SLURMD_PID" slurmd; then
        write_conf
    fi
    install_global_conf
    start_munge
    if ! alive "$CTLD_PID" slurmctld; then
        # -c: a fresh cluster; jobs left by an earlier one in this directory must never start again.
        slurmctld -f "$CONF" -c || { show_logs; die "slurmctld failed to start"; }
        wait_for slurmctld 20 alive "$CTLD_PID" slurmctld || { show_logs; die "slurmctld did not stay up"; }
    fi
    if ! alive "$SLURMD_PID" slurmd; then
        slurmd -f "$CONF" -N "$NODE" || { show_logs; die "slurmd failed to start"; }
        wait_for slurmd 20 alive "$SLURMD_PID" slurmd || { show_logs; die "slurmd did not stay up"; }
    fi
    if ! wait_for "node $NODE" "$START_TIMEOUT" node_idle; then
        # A node left DOWN/DRAIN by an earlier run comes back with an explicit resume.
        bounded scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true
        wait_for "node $NODE" 10 node_idle || { show_logs; die "node $NODE is '$(node_state)', not idle"; }
    fi
    log "up: SLURM_CONF=$CONF, node $NODE $(node_state), partition $PARTITION"
}

# stop_daemon PIDFILE NAME: SIGTERM, bounded wait, then SIGKILL.
stop_daemon() {
    local pidfile=$1 name=$2 pid deadline
    if ! alive "$pidfile" "$name"; then
        rm -f "$pidfile"
        return 0
    fi
    pid=$(<"$pidfile")
    kill -TERM "$pid" 2>/dev/null || true
    deadline=$((SECONDS + STOP_TIMEOUT))
    while [[ -d /proc/$pid ]] && ((SECONDS < deadline)); do
        sleep 0.2
    done
    if [[ -d /proc/$pid ]]; then
        log "$name ($pid) ignored SIGTERM for ${STOP_TIMEOUT}s: killing it"
        kill -KILL "$pid" 2>/dev/null || true
        sleep 0.5
    fi
    rm -f "$pidfile"
}

cmd_stop() {
    # Jobs still running belong to this cluster only: cancel them so slurmd exits promptly.
    if alive "$CTLD_PID" slurmctld; then
        bounded scancel --full --partition="$PARTITION" >/dev/null 2>&1 || true
    fi
    stop_daemon "$SLURMD_PID" slurmd
    stop_daemon "$CTLD_PID" slurmctld
    stop_daemon "$MUNGE_PID" munged
    remove_global_conf
    log "stopped"
}

cmd_status() {
    local ok=0 pair pidfile name
    for pair in "$MUNGE_PID:munged" "$CTLD_PID:slurmctld" "$SLURMD_PID:slurmd"; do
        pidfile=${pair%%:*}
        name=${pair##*:}
        if alive "$pidfile" "$name"; then
            echo "$name: running (pid $(<"$pidfile"))"
        else
            echo "$name: stopped"
            ok=1
        fi
    done
    if ((ok == 0)); then
        echo "node $NODE: $(node_state)"
        node_idle || ok=1
    fi
    echo "SLURM_CONF=$CONF"
    return "$ok"
}

cmd_env() {
    echo "export SLURM_CONF=$CONF"
}

case ${1:-} in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    env) cmd_env ;;
    *)
        echo "usage: $0 start|stop|status|env" >&2
        exit 2
        ;;
esac
