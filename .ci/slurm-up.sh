#!/usr/bin/env bash
# Start a throw-away single-node SLURM cluster with accounting on this machine (Debian 12, root,
# no systemd needed):  munged -> mariadbd -> slurmdbd -> slurmctld -> slurmd.
# Partitions: `debug` (default) and `high`; a `high` job pre-empts `debug` jobs, which are sent
# SIGUSR2 (submitit checkpoints and requeues) and requeued.
# Stop it with .ci/slurm-down.sh. Adapted from ../shared/slurm/ (its README lists the pitfalls).
#
# Idempotent: when the cluster this script started is up, it prints `sinfo` and exits; otherwise it
# stops any half-started leftovers and starts from a fresh state dir (job ids restart at 1 and the
# accounting database is empty, so old job records never shadow new ones).
#
# Env: SLURM_CI_BASE        state dir (default: dpm-slurm in the temp dir)
#      SLURM_CI_ACCOUNTING  1 (default) or 0: skip MariaDB + slurmdbd (then submitit cannot see
#                           jobs that die without a result: keep it on for the tests)
#      SLURM_CI_DBPORT      the private MariaDB's TCP port on 127.0.0.1 (default 3307)
#      SLURM_CI_NO_INSTALL  1: never apt-get install the packages (fail instead)
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
BASE=${SLURM_CI_BASE:-${TMPDIR:-/tmp}/dpm-slurm}
ACCT=${SLURM_CI_ACCOUNTING:-1}
DBPORT=${SLURM_CI_DBPORT:-3307}
DBPW=slurmci
CONF=/etc/slurm/slurm.conf
MARK="# written by dpm .ci/slurm-up.sh"

log() { echo "slurm-up: $*" >&2; }
waitfor() {  # waitfor <tries of 0.2 s> <command...>
  local n=$1; shift
  for _ in $(seq "$n"); do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done
  log "timeout waiting for: $*"; return 1
}
alive() { [ -s "$1" ] && [ -r "/proc/$(cat "$1")/stat" ] && [ "$(awk '{print $3}' "/proc/$(cat "$1")/stat")" != Z ]; }
on_error() {
  log "FAILED (line $1); last log lines from $BASE/log:"
  for f in "$BASE"/log/*.log; do [ -f "$f" ] && { echo "== $f"; tail -n 15 "$f"; }; done >&2
}
trap 'on_error $LINENO' ERR

[ "$(id -u)" = 0 ] || { log "must run as root (daemons run as root, slurm.conf lives in /etc/slurm)"; exit 1; }

# 0. packages (Debian: slurm-wlm pulls slurmctld, slurmd and the client tools)
need=(slurmctld slurmd sinfo sbatch sacct scontrol munged)
pkgs=(slurm-wlm munge)
if [ "$ACCT" = 1 ]; then need+=(slurmdbd mariadbd mariadb-install-db); pkgs+=(slurmdbd mariadb-server); fi
missing=()
for c in "${need[@]}"; do command -v "$c" >/dev/null 2>&1 || [ -x "/usr/sbin/$c" ] || missing+=("$c"); done
if [ ${#missing[@]} -gt 0 ]; then
  [ "${SLURM_CI_NO_INSTALL:-0}" = 1 ] && { log "missing ${missing[*]} and SLURM_CI_NO_INSTALL=1"; exit 1; }
  log "installing ${pkgs[*]} (missing: ${missing[*]})"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq "${pkgs[@]}" >/dev/null 2>&1 || {
    apt-get update -qq && apt-get install -y -qq "${pkgs[@]}" >/dev/null; }
fi

# 1. already up? (our pid files alive and the node answers)
if alive "$BASE/run/slurmctld.pid" && alive "$BASE/run/slurmd.pid" \
   && { [ "$ACCT" = 0 ] || alive "$BASE/run/slurmdbd.pid"; } \
   && sinfo -h >/dev/null 2>&1 && grep -qF "$MARK" "$CONF" 2>/dev/null; then
  log "already running (state in $BASE)"
  sinfo
  exit 0
fi
# Leftovers of a half-started or crashed cluster: stop them, then start from a fresh state dir.
SLURM_CI_BASE=$BASE "$HERE/slurm-down.sh" >/dev/null 2>&1 || true
rm -rf "$BASE"
mkdir -p "$BASE"/{ctld,spool,log,run}

HOST=$(hostname -s)
NCPU=$(nproc)
MEM=$(awk '/MemTotal/ {printf "%d", $2/1024*0.9}' /proc/meminfo)   # MiB; must not exceed the real memory
DEFMEM=$(( MEM / NCPU < 1000 ? MEM / NCPU : 1000 ))                 # a job without --mem must not take the node

# 2. the hostname must resolve (SlurmctldHost / NodeName are looked up)
getent hosts "$HOST" >/dev/null || echo "127.0.0.1 $HOST" >> /etc/hosts

# 3. munge (Debian's postinst creates /etc/munge/munge.key; make one otherwise)
[ -s /etc/munge/munge.key ] || mungekey --create --force
chown -R munge:munge /etc/munge /var/log/munge /var/lib/munge
chmod 700 /etc/munge; chmod 600 /etc/munge/munge.key
install -d -o munge -g munge -m 755 /run/munge
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  runuser -u munge -- /usr/sbin/munged          # forks; pid in /run/munge/munged.pid
  waitfor 50 sh -c 'munge -n | unmunge'
  cp /run/munge/munged.pid "$BASE/run/munged.pid"   # remember that *we* started it (down stops only ours)
fi

# 4. slurm.conf: one node = this host, no cgroups, everything as root
if [ "$ACCT" = 1 ]; then
  ACCT_LINES="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=$HOST
AccountingStoragePort=6819
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30"
else
  ACCT_LINES="AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none"
fi
if [ -f "$CONF" ] && ! grep -qF "$MARK" "$CONF"; then
  cp "$CONF" "$CONF.dpm-orig"; log "kept the existing $CONF as $CONF.dpm-orig"
fi
mkdir -p /etc/slurm
cat > "$CONF" <<CONF
$MARK (state in $BASE)
ClusterName=ci
SlurmctldHost=$HOST
AuthType=auth/munge
AuthInfo=cred_expire=5
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$BASE/ctld
SlurmdSpoolDir=$BASE/spool
SlurmctldPidFile=$BASE/run/slurmctld.pid
SlurmdPidFile=$BASE/run/slurmd.pid
SlurmctldLogFile=$BASE/log/slurmctld.log
SlurmdLogFile=$BASE/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
DefMemPerCPU=$DEFMEM
ReturnToService=2
$ACCT_LINES
JobCompType=jobcomp/none
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=300
KillWait=5
Waittime=0
SchedulerParameters=batch_sched_delay=0,sched_interval=2,bf_interval=2
MailProg=/bin/true
NodeName=$HOST CPUs=$NCPU RealMemory=$MEM State=UNKNOWN
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
SlurmctldParameters=preempt_send_user_signal
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=REQUEUE GraceTime=30
PartitionName=high Nodes=ALL MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF
CONF

# 5. accounting: a private MariaDB (TCP 127.0.0.1:$DBPORT, data in $BASE) + slurmdbd
if [ "$ACCT" = 1 ]; then
  DB="$BASE/mysql"
  MYOPTS=(--no-defaults --datadir="$DB" --user=root --innodb-log-file-size=64M --innodb-lock-wait-timeout=900)
  mariadb-install-db "${MYOPTS[@]}" --auth-root-authentication-method=socket --skip-test-db \
      > "$BASE/log/mariadb-install.log" 2>&1
  cat > "$BASE/run/init.sql" <<SQL
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$DBPW';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
SQL
  setsid -f /usr/sbin/mariadbd "${MYOPTS[@]}" --bind-address=127.0.0.1 --port="$DBPORT" \
      --socket="$BASE/run/mysqld.sock" --pid-file="$BASE/run/mariadbd.pid" \
      --log-error="$BASE/log/mariadb.log" --skip-log-bin \
      --init-file="$BASE/run/init.sql" > /dev/null 2>&1
  waitfor 100 mariadb-admin --no-defaults --socket="$BASE/run/mysqld.sock" ping
  cat > /etc/slurm/slurmdbd.conf <<CONF
$MARK
AuthType=auth/munge
DbdHost=$HOST
DbdPort=6819
SlurmUser=root
DebugLevel=info
LogFile=$BASE/log/slurmdbd.log
PidFile=$BASE/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DBPORT
StorageUser=slurm
StoragePass=$DBPW
StorageLoc=slurm_acct_db
CONF
  chmod 600 /etc/slurm/slurmdbd.conf            # slurmdbd refuses a world-readable file
  /usr/sbin/slurmdbd                            # forks
  waitfor 150 sacctmgr -n show cluster          # tables get created on first start
fi

# 6. controller + node daemon (both fork; pid files under $BASE/run)
/usr/sbin/slurmctld -i          # -i: ignore any state left from an earlier run
/usr/sbin/slurmd
waitfor 150 sh -c "[ \"\$(sinfo -h -n $HOST -o %t | sort -u)\" = idle ]"
log "up: node $HOST, $NCPU CPUs, $MEM MiB (DefMemPerCPU=$DEFMEM), accounting=$ACCT, state in $BASE"
sinfo
