#!/bin/sh
# A one-node Slurm cluster on this machine, for tests/test_launchers.py's Slurm test (which skips where no
# cluster answers). For a throwaway machine or container, as root: it writes /etc/slurm/slurm.conf.
#   apt-get install -y slurmctld slurmd slurm-client munge && sh tests/slurm/start_single_node.sh
# Without accounting storage, submitit warns that sacct fails ("status may be inaccurate"); it then reads
# each job's result from its folder. The test ignores those warnings.
set -eu
host=$(hostname)
cpus=$(nproc)
memory=$(awk '/MemTotal/ {print int($2 / 1024 * 0.8)}' /proc/meminfo)
cat > /etc/slurm/slurm.conf <<CONF
ClusterName=local
SlurmctldHost=$host
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
SlurmUser=root
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmdSpoolDir=/var/spool/slurmd
StateSaveLocation=/var/spool/slurmctld
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
MpiDefault=none
NodeName=$host CPUs=$cpus RealMemory=$memory State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF
mkdir -p /var/spool/slurmd /var/spool/slurmctld /var/log/slurm /run/munge
chown munge:munge /run/munge
pgrep -x munged > /dev/null || munged --force
pgrep -x slurmctld > /dev/null || slurmctld
pgrep -x slurmd > /dev/null || slurmd
sleep 2
timeout 60 srun --nodes=1 --time=1 true  # fails here if the node cannot run jobs
sinfo
