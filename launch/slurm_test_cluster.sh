#!/usr/bin/env bash
# A real two-node Slurm 22.05 cluster on this one machine, for tests: `start` (idempotent) or `stop`.
#
#   launch/slurm_test_cluster.sh start   # installs the Debian packages if missing, ~15 s to two idle nodes
#   launch/slurm_test_cluster.sh stop    # kills the daemons, removes namespaces, bridge and /etc/hosts lines
#
# Nodes node1/node2 are network namespaces on a bridge (10.77.0.11/12; the controller is 10.77.0.1 on the
# host), entered with `nsenter --net=` (not `ip netns exec`, which remounts /sys and hides the cgroup tree
# from slurmd). Private munge key and socket under $STATE (socket dir 0755); `cred_expire=10` and
# `sched_interval=2` so a requeued job restarts in seconds. /etc/hosts is appended to, never replaced.
set -euo pipefail

STATE=${MTP_SLURM_STATE:-/tmp/mtp-slurm}
NODES=(node1 node2)
IPS=(10.77.0.11 10.77.0.12)
CTL_IP=10.77.0.1
HOSTS_TAG="# mtp-slurm-test"

need_root() { [ "$(id -u)" -eq 0 ] || { echo "slurm_test_cluster: needs root (network namespaces, daemons)" >&2; exit 2; }; }

install() {
  if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    echo "slurm_test_cluster: installing slurmctld slurmd slurm-client munge"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurmctld slurmd slurm-client munge >/dev/null \
      || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurmctld slurmd slurm-client munge >/dev/null; }
  fi
}

stop() {
  # every daemon started with this state directory (pid files are not written by a daemon that failed early)
  pkill -f -- "$STATE/slurm.conf" 2>/dev/null || true
  pkill -f -- "--key-file=$STATE/munge.key" 2>/dev/null || true
  sleep 0.5
  pkill -9 -f -- "$STATE/slurm.conf" 2>/dev/null || true
  pkill -9 -f -- "--key-file=$STATE/munge.key" 2>/dev/null || true
  rm -f "$STATE"/*.pid
  for n in "${NODES[@]}"; do
    ip link del "veth-$n" 2>/dev/null || true
    ip netns del "$n" 2>/dev/null || true
  done
  ip link del mtpbr0 2>/dev/null || true
  if grep -q "$HOSTS_TAG" /etc/hosts 2>/dev/null; then
    grep -v "$HOSTS_TAG" /etc/hosts > "$STATE.hosts" && cat "$STATE.hosts" > /etc/hosts && rm -f "$STATE.hosts"
  fi
}

write_conf() {
  cat > "$STATE/slurm.conf" <<EOF
ClusterName=mtptest
SlurmctldHost=$(hostname -s)($CTL_IP)
MailProg=/bin/true
AuthType=auth/munge
AuthInfo=socket=$STATE/munge/munge.socket.2,cred_expire=10
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool-%n
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd-%n.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerParameters=sched_interval=2
ReturnToService=2
EnforcePartLimits=ALL
JobRequeue=1
KillWait=10
MinJobAge=300
SlurmctldTimeout=30
SlurmdTimeout=30
NodeName=node1 NodeAddr=${IPS[0]} CPUs=2 State=UNKNOWN
NodeName=node2 NodeAddr=${IPS[1]} CPUs=2 State=UNKNOWN
PartitionName=debug Nodes=node1,node2 Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
EOF
}

start() {
  need_root
  install
  stop
  trap 'echo "slurm_test_cluster: start failed, cleaning up" >&2; stop' ERR
  # a fresh cluster every start: jobs an earlier (killed or failed) run left in the controller's saved
  # state would hold the nodes and keep them from becoming idle
  rm -rf "$STATE/ctld" "$STATE"/spool-node*
  mkdir -p "$STATE/munge" "$STATE/ctld" "$STATE/spool-node1" "$STATE/spool-node2"
  chmod 0755 "$STATE/munge"
  [ -f "$STATE/munge.key" ] || { dd if=/dev/urandom of="$STATE/munge.key" bs=1024 count=1 2>/dev/null; chmod 0400 "$STATE/munge.key"; }
  munged --force --key-file="$STATE/munge.key" --socket="$STATE/munge/munge.socket.2" \
    --pid-file="$STATE/munged.pid" --log-file="$STATE/munged.log" --seed-file="$STATE/munge.seed"

  ip link add mtpbr0 type bridge
  ip addr add "$CTL_IP/24" dev mtpbr0
  ip link set mtpbr0 up
  for i in 0 1; do
    n=${NODES[$i]}
    ip netns add "$n"
    ip link add "veth-$n" type veth peer name eth0 netns "$n"
    ip link set "veth-$n" master mtpbr0 up
    ip -n "$n" addr add "${IPS[$i]}/24" dev eth0
    ip -n "$n" link set eth0 up
    ip -n "$n" link set lo up
  done
  { echo "$CTL_IP mtpctl $HOSTS_TAG"; echo "${IPS[0]} node1 $HOSTS_TAG"; echo "${IPS[1]} node2 $HOSTS_TAG"; } >> /etc/hosts

  write_conf
  export SLURM_CONF="$STATE/slurm.conf"
  slurmctld -f "$SLURM_CONF"
  for n in "${NODES[@]}"; do
    nsenter --net="/var/run/netns/$n" slurmd -f "$SLURM_CONF" -N "$n"
  done
  for _ in $(seq 1 60); do
    if [ "$(timeout 3 sinfo -h -N -t idle -o '%N' 2>/dev/null | sort -u | wc -l)" = "2" ]; then
      trap - ERR
      echo "slurm_test_cluster: up (SLURM_CONF=$SLURM_CONF)"
      return 0
    fi
    sleep 0.5
  done
  echo "slurm_test_cluster: nodes did not become idle; logs in $STATE" >&2
  timeout 3 sinfo >&2 || true
  tail -n 20 "$STATE"/*.log >&2 || true
  stop
  exit 1
}

case "${1:-}" in
  start) start ;;
  stop) need_root; stop ;;
  *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
