#!/usr/bin/env bash
# A real single-node Slurm cluster on this machine, for the tests and for trying sweeps on a laptop:
# munge, MariaDB + slurmdbd (accounting, so job states are known after jobs end), slurmctld and slurmd.
# Idempotent: installs what is missing, (re)writes the configs, starts what is not running, waits until the
# node is idle. Run as root:  sudo bash launchers/local-slurm/setup.sh
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

need=()
for cmd in slurmctld slurmd slurmdbd munged mariadbd; do
  command -v "$cmd" >/dev/null 2>&1 || [ -x "/usr/sbin/$cmd" ] || need+=("$cmd")
done
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -q
  apt-get install -y -q slurm-wlm slurmdbd mariadb-server munge
fi

HOST=$(hostname -s)
CPUS=$(nproc)
MEM_MB=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 2048 ))
CONF=/etc/slurm
mkdir -p "$CONF" /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/munge /var/log/munge /var/lib/munge

# --- munge (runs as user munge) ---------------------------------------------------------------------------
if [ ! -s /etc/munge/munge.key ]; then
  dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null
fi
chown -R munge:munge /etc/munge /run/munge /var/log/munge /var/lib/munge
chmod 400 /etc/munge/munge.key
if ! pgrep -x munged >/dev/null; then
  runuser -u munge -- /usr/sbin/munged
fi

# --- MariaDB + slurmdbd --------------------------------------------------------------------------------------
if ! pgrep -x mariadbd >/dev/null && ! pgrep -x mysqld >/dev/null; then
  mkdir -p /run/mysqld && chown mysql:mysql /run/mysqld
  (mysqld_safe >/var/log/slurm/mysqld_safe.log 2>&1 &)
fi
for _ in $(seq 60); do mysqladmin ping >/dev/null 2>&1 && break; sleep 1; done
mysql -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
          CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'w2sg-local';
          GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;"

cat > "$CONF/slurmdbd.conf" <<CONF
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
LogFile=/var/log/slurm/slurmdbd.log
PidFile=/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=w2sg-local
StorageLoc=slurm_acct_db
CONF
chmod 600 "$CONF/slurmdbd.conf"

cat > "$CONF/slurm.conf" <<CONF
ClusterName=w2sg-local
SlurmctldHost=$HOST
SlurmUser=root
AuthType=auth/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
ReturnToService=2
JobRequeue=1
KillWait=10
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
NodeName=$HOST CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
CONF

if ! pgrep -x slurmdbd >/dev/null; then /usr/sbin/slurmdbd; fi
for _ in $(seq 60); do sacctmgr -n list cluster >/dev/null 2>&1 && break; sleep 1; done
sacctmgr -i -n add cluster w2sg-local >/dev/null 2>&1 || true
# A controller started here starts clean (-c): jobs saved by an earlier boot of this machine (a session or CI run
# that was stopped mid-sweep) would otherwise be recovered and requeued, and hold the node's CPUs for their time
# limit while new jobs pend behind them. A running controller keeps its jobs.
if ! pgrep -x slurmctld >/dev/null; then /usr/sbin/slurmctld -c; else scontrol reconfigure || true; fi
if ! pgrep -x slurmd >/dev/null; then /usr/sbin/slurmd -c; fi

for _ in $(seq 60); do
  state=$(sinfo -h -n "$HOST" -o %t 2>/dev/null || true)
  case "$state" in idle*|mix*|alloc*) break ;; down*|drain*) scontrol update nodename="$HOST" state=resume || true ;; esac
  sleep 1
done
sinfo
left=$(squeue -h -o %i | wc -l)
if [ "$left" -gt 0 ]; then
  echo "note: $left job(s) already in the queue (the controller was running): squeue shows them; CI cancels them"
fi
echo "local Slurm ready: $CPUS CPUs, ${MEM_MB} MB on node $HOST"
