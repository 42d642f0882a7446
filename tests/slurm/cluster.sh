#!/bin/bash
# A throw-away Slurm cluster on this one machine, for tests/test_slurm.py: NNODES slurmd "nodes" c1, c2, ...,
# each in its own network + UTS namespace (its own IP 10.200.0.1N, its own hostname), one slurmctld in the root
# namespace on a private bridge. Nothing leaves the machine: no route, no NAT. Needs root, iproute2, nsenter and
# the Debian packages slurmctld slurmd slurm-client munge (Slurm 22.05); installs nothing.
#
#   tests/slurm/cluster.sh up BASE      # ~1-2 s; writes BASE/slurm.conf and BASE/env.sh (export SLURM_CONF=...)
#   tests/slurm/cluster.sh down BASE    # ~3 s; cancels jobs, stops the daemons, deletes the namespaces
#
# env: NNODES (default 2), AUTH=munge (default) | none.
# Adapted from the verified recipe in /work/shared/notes/slurm-test-cluster.md; the why of each choice is there.
set -euo pipefail
ACTION=${1:?usage: cluster.sh up|down BASE}
BASE=${2:?usage: cluster.sh up|down BASE}
NNODES=${NNODES:-2}
AUTH=${AUTH:-munge}
export SLURM_CONF=$BASE/slurm.conf
BRIDGE=slbr0

up() {
  command -v slurmctld >/dev/null || {
    echo "slurmctld not found: apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge" >&2
    exit 1
  }
  # The bridge, namespace names and 10.200.0.0/24 are machine-wide: one such cluster at a time.
  if ip link show "$BRIDGE" >/dev/null 2>&1 || ip netns list 2>/dev/null | grep -q '^slnode'; then
    if pgrep -x slurmctld >/dev/null || pgrep -x slurmd >/dev/null; then
      echo "a test cluster is already up on this machine (bridge $BRIDGE or netns slnode* exist, slurm daemons" \
        "running); tear it down with: tests/slurm/cluster.sh down <its BASE>" \
        "(tests/test_slurm.py uses /tmp/arxiv-ft-slurm-*)" >&2
      exit 1
    fi
    # No Slurm daemon alive: the network of a run that was killed before its `down` (seen here: the sandbox restarted,
    # its processes died, its bridge and namespaces stayed, and the next CI run failed on them). Only we use the names.
    echo "removing a dead test cluster's network (bridge $BRIDGE, netns slnode*): no slurm daemon is running" >&2
    delete_network $(ip netns list 2>/dev/null | awk '/^slnode/ {print $1}')
  fi
  local host ncpu=2 mem=4000 nodes="" i j ns
  host=$(hostname -s)
  mkdir -p "$BASE"/{state,spool,log,munge,mungekey}
  chmod 755 "$BASE/munge"     # munged refuses a socket folder without o+x
  chmod 700 "$BASE/mungekey"

  local authconf
  if [ "$AUTH" = munge ]; then
    local d
    d=$(cd "$BASE" && pwd)
    while [ "$d" != / ]; do   # munged refuses a socket below a folder without o+x (pytest's tmp dirs are 0700)
      if [ "$(($(stat -c %#a "$d") & 1))" != 1 ]; then
        echo "munged needs o+x on $d: use another BASE or AUTH=none" >&2
        exit 1
      fi
      d=$(dirname "$d")
    done
    [ -f "$BASE/mungekey/munge.key" ] || mungekey -c -k "$BASE/mungekey/munge.key"
    munged --key-file="$BASE/mungekey/munge.key" --socket="$BASE/munge/munge.socket.2" \
      --pid-file="$BASE/munge/munged.pid" --log-file="$BASE/log/munged.log" --seed-file="$BASE/mungekey/munged.seed"
    authconf="AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$BASE/munge/munge.socket.2,cred_expire=10"
  else
    authconf="AuthType=auth/none
CredType=cred/none
AuthInfo=cred_expire=10"
  fi
  for i in $(seq 1 "$NNODES"); do
    nodes+="NodeName=c$i NodeHostname=c$i NodeAddr=10.200.0.$((10 + i)) CPUs=$ncpu RealMemory=$mem State=UNKNOWN"$'\n'
  done

  # cred_expire=10: a requeued job may start again ~10 s after it ended (Slurm's default is 120 s).
  # proctrack/pgid: linuxproc leaks orphaned children; cgroup needs delegation this machine does not have.
  # config_overrides: every fake node may declare CPUs=2 on a machine with 2 cores in all.
  cat >"$SLURM_CONF" <<EOF
ClusterName=ci
SlurmctldHost=$host(10.200.0.1)
SlurmctldPort=6817
SlurmdPort=6818
SlurmUser=root
SlurmdUser=root
$authconf
StateSaveLocation=$BASE/state
SlurmdSpoolDir=$BASE/spool/%n
SlurmctldPidFile=$BASE/slurmctld.pid
SlurmdPidFile=$BASE/slurmd-%n.pid
SlurmctldLogFile=$BASE/log/slurmctld.log
SlurmdLogFile=$BASE/log/slurmd-%n.log
ProctrackType=proctrack/pgid
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$BASE/log/jobcomp.txt
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SlurmdParameters=config_overrides
DefMemPerCPU=512
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
KillWait=10
InactiveLimit=0
MinJobAge=300
$nodes
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF

  : >"$BASE/netns.list"   # before the bridge: `down` removes the network only when this file says it is ours
  ip link add "$BRIDGE" type bridge
  ip addr add 10.200.0.1/24 dev "$BRIDGE"
  ip link set "$BRIDGE" up
  for i in $(seq 1 "$NNODES"); do
    ns=slnode$i
    ip netns add "$ns"
    echo "$ns" >>"$BASE/netns.list"
    ip link add "slv${i}h" type veth peer name "slv${i}n"
    ip link set "slv${i}h" master "$BRIDGE"
    ip link set "slv${i}h" up
    ip link set "slv${i}n" netns "$ns"
    ip -n "$ns" addr add "10.200.0.$((10 + i))/24" dev "slv${i}n"
    ip -n "$ns" link set "slv${i}n" up
    ip -n "$ns" link set lo up
    mkdir -p "/etc/netns/$ns"
    {
      echo "127.0.0.1 localhost"
      echo "10.200.0.1 $host"
      for j in $(seq 1 "$NNODES"); do echo "10.200.0.$((10 + j)) c$j"; done
    } >"/etc/netns/$ns/hosts"
  done

  slurmctld
  for i in $(seq 1 "$NNODES"); do
    # Not `ip netns exec`: it remounts /sys, and slurmd 22.05 dies without /sys/fs/cgroup. nsenter keeps /sys.
    # The private mount namespace lets each node see its own /etc/hosts (c1, c2 resolve inside every node).
    nsenter --net="/run/netns/slnode$i" unshare --mount --uts sh -c \
      "mount --bind /etc/netns/slnode$i/hosts /etc/hosts && hostname c$i && exec slurmd -N c$i"
  done
  for _ in $(seq 1 300); do
    [ "$(sinfo -h -N -o %T 2>/dev/null | grep -cx idle)" = "$NNODES" ] && break
    sleep 0.1
  done
  if [ "$(sinfo -h -N -o %T | grep -cx idle)" != "$NNODES" ]; then
    sinfo -N >&2 || true
    echo "cluster not idle after 30 s; see $BASE/log" >&2
    exit 1
  fi
  echo "export SLURM_CONF=$SLURM_CONF" >"$BASE/env.sh"
  echo "export SLURM_CONF=$SLURM_CONF"
}

down() {
  set +e
  if [ -f "$BASE/slurmctld.pid" ] && kill -0 "$(cat "$BASE/slurmctld.pid")" 2>/dev/null; then
    scancel --user="$(id -un)" 2>/dev/null
    for _ in $(seq 1 100); do
      [ -z "$(squeue -h 2>/dev/null)" ] && break
      sleep 0.2
    done
  fi
  local pids=() f p e env_ ns
  for f in "$BASE"/slurmd-*.pid "$BASE/slurmctld.pid" "$BASE/munge/munged.pid"; do
    [ -e "$f" ] || continue
    p=$(cat "$f")
    kill "$p" 2>/dev/null && pids+=("$p")
  done
  for p in "${pids[@]}"; do   # all were signalled at once; each needs ~2 s
    for _ in $(seq 1 150); do
      kill -0 "$p" 2>/dev/null || break
      sleep 0.1
    done
    kill -0 "$p" 2>/dev/null && { echo "pid $p still alive after 15 s: SIGKILL" >&2; kill -9 "$p"; }
  done
  # Job processes that escaped proctrack/pgid (torch's launcher starts workers in new sessions): they carry this
  # cluster's SLURM_CONF and a SLURM_JOB_ID in their environment. Killed one by one, by pid.
  for e in /proc/[0-9]*/environ; do
    env_=$(tr '\0' '\n' 2>/dev/null <"$e") || continue
    if grep -qx "SLURM_CONF=$SLURM_CONF" <<<"$env_" && grep -q '^SLURM_JOB_ID=' <<<"$env_"; then
      p=${e#/proc/}
      p=${p%/environ}
      echo "killing leaked job process $p: $(tr '\0' ' ' 2>/dev/null <"/proc/$p/cmdline" | cut -c1-100)" >&2
      kill -9 "$p" 2>/dev/null
    fi
  done
  if [ -f "$BASE/netns.list" ]; then
    delete_network $(cat "$BASE/netns.list")
    rm -f "$BASE/netns.list"
  fi
  return 0
}

# delete_network NS...: the namespaces NS (and their /etc/netns hosts files), then the bridge. Never fails (up runs
# it under set -e): whatever is already gone is skipped.
delete_network() {
  local ns
  for ns in "$@"; do
    ip netns del "$ns" 2>/dev/null || true
    rm -rf "/etc/netns/$ns"
  done
  rmdir /etc/netns 2>/dev/null || true
  ip link del "$BRIDGE" 2>/dev/null || true
}

case $ACTION in
  up) up ;;
  down) down ;;
  *) echo "usage: cluster.sh up|down BASE" >&2; exit 2 ;;
esac
