#!/usr/bin/env bash
# Bring up a single-machine Slurm that SkyPilot 0.14 can launch managed jobs on:
#   slurmctld + $SUPERVISE_SLURM_NODES slurmd (default 2; Debian slurm-wlm, auth/none:
#   no munge), node i on 127.0.0.i, each its own slurmd (`slurmd -N <node>`),
#   an sshd on 127.0.0.1:$SUPERVISE_SLURM_SSH_PORT as the login node for an
#   unprivileged user, ~/.slurm/config + ~/.sky/config.yaml in an isolated HOME,
#   the offline stand-ins for the two downloads SkyPilot's node set-up makes,
#   and `sky api start`. supervise itself reaches the node the way it does on a
#   cloud: `supervise start` ships its wheel with the job (a file_mounts entry).
# Needs root and `sky` on PATH (the project's venv). Undo with down.sh.
# Prints the seconds each phase took; a failing phase stops the script.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
. "$here/common.sh"
S="$SUPERVISE_SLURM_DIR"; U="$SUPERVISE_SLURM_USER"; P="$SUPERVISE_SLURM_SSH_PORT"; H="$SUPERVISE_SLURM_SKY_HOME"
[ "$(id -u)" = 0 ] || { echo "up.sh: needs root (starts slurmd and sshd)" >&2; exit 1; }
sky_bin="$(command -v sky)" || { echo "up.sh: \`sky\` not on PATH: activate the venv with skypilot installed" >&2; exit 1; }
py="$(dirname "$sky_bin")/python"
t0=$SECONDS; phase() { echo "up.sh: $1 ($((SECONDS - t0))s)"; }

bash "$here/install.sh"; phase "packages"

# -- the login-node user and the state folder -----------------------------------
id "$U" >/dev/null 2>&1 || useradd --create-home --shell /bin/bash "$U"
usermod -p '*' "$U"  # not locked (sshd refuses '!'), still no password: key auth only
install -d -m 755 "$S" "$S/bin" "$S/slurm" "$S/ssh"
install -d -m 700 "$S/slurm/state"
# slurmstepd runs each job's script from the node's spool folder as the job's user: the
# folders above it must let that user through (slurmd makes the node's own folder 755).
install -d -m 755 "$S/slurm/spool"
install -d -m 700 "$H" "$H/.ssh" "$H/.slurm" "$H/.sky"

# -- offline stand-ins for SkyPilot's node set-up ----------------------------------
# It runs `curl -LsSf https://astral.sh/uv/install.sh | sh` and `uv venv --python 3.10`;
# neither astral.sh nor python downloads are reachable. The uv binary is PyPI's.
# This machine has Python 3.11 only. The stand-in gives a request for 3.11 the system
# python3 (what uv would download), and 3.10 only to SkyPilot's own runtime venv
# (~/skypilot-runtime; SkyPilot runs on 3.11 too). Any other 3.10 request -- or a venv
# with no --python, which on the clouds' Ubuntu 22.04 images is 3.10 -- fails, as
# TorchTitan 0.3.0 (Requires-Python >= 3.11) would there: this test must not hide it.
[ -x "$S/uv/bin/uv" ] || "$py" -m pip install --quiet --disable-pip-version-check --target "$S/uv" uv
cat > "$S/bin/uv" <<EOF
#!/bin/sh
export UV_PYTHON_DOWNLOADS=never
# The machine reaches PyPI through a TLS proxy whose CA is in the system store only.
export UV_SYSTEM_CERTS=true
if [ "\$1" = venv ]; then
  want=; target=; prev=
  for a do
    case "\$prev" in --python) want=\$a ;; esac
    case "\$a" in --python=*) want=\${a#--python=} ;; -*) ;; *) [ "\$prev" = --python ] || [ "\$a" = venv ] || target=\$a ;; esac
    prev=\$a
  done
  case "\$want:\$target" in
    3.11:*|3.11.*:*|/*:*) ;;
    3.10:*skypilot-runtime) ;;
    *) echo "uv stand-in: error: no Python \${want:-(default: the image's python3, 3.10 on Ubuntu 22.04)} for \$target here; on the clouds' default images that is 3.10, where TorchTitan 0.3.0 (Requires-Python >=3.11) cannot be installed" >&2
       exit 2 ;;
  esac
  prev=
  for a do
    shift
    case "\$prev:\$a" in --python:3.10|--python:3.11) a=/usr/bin/python3 ;; esac
    case "\$a" in --python=3.10|--python=3.11) a=--python=/usr/bin/python3 ;; esac
    set -- "\$@" "\$a"; prev=\$a
  done
fi
PYTHONPATH= exec "$S/uv/bin/uv" "\$@"
EOF
cat > "$S/bin/uv-install.sh" <<EOF
#!/bin/sh
# What https://astral.sh/uv/install.sh does, offline: put uv in \$UV_INSTALL_DIR.
set -e
dir="\${UV_INSTALL_DIR:-\$HOME/.local/bin}"
mkdir -p "\$dir" && cp "$S/bin/uv" "\$dir/uv" && chmod 755 "\$dir/uv"
echo "uv (offline, PyPI binary) installed to \$dir"
EOF
cat > "$S/bin/curl" <<EOF
#!/bin/sh
# curl, except that the uv installer URL is answered from disk (no internet here).
for a do
  case "\$a" in https://astral.sh/uv/install.sh) exec cat "$S/bin/uv-install.sh" ;; esac
done
exec /usr/bin/curl "\$@"
EOF
chmod 755 "$S/bin/uv" "$S/bin/uv-install.sh" "$S/bin/curl"

phase "offline wrappers, uv"

# The login shell of $U (bash --login) must find the wrappers and the Slurm config;
# srun passes this environment on to every step on the node.
uhome="$(getent passwd "$U" | cut -d: -f6)"
marker="# supervise-slurm"
# The machine's own pip find-links (on this kind of machine, the local torch CPU
# wheel: `torch==2.13.0` from PyPI would be a multi-GB CUDA build). Nothing of ours.
# uv reads no pip configuration: the nodes' setup installs with uv (SkyPilot puts it
# on every node), so it gets the same folders as UV_FIND_LINKS (measured: without it
# the CPU nodes installed CUDA torch and 19 nvidia-* wheels, a 5.2 GB venv).
machine_links="$("$py" -m pip config get global.find-links 2>/dev/null | tr '\n' ' ' || true)"
uv_links=""  # the folders that exist: uv fails on a missing one, pip skips it
for link in $machine_links; do [ ! -d "$link" ] || uv_links="${uv_links:+$uv_links,}$link"; done
sed -i "/$marker/d" "$uhome/.profile" 2>/dev/null || true
{
  echo "export PATH=\"$S/bin:\$PATH\" $marker"
  echo "export SLURM_CONF=\"$SLURM_CONF\" $marker"
  [ -z "$machine_links" ] || echo "export PIP_FIND_LINKS=\"$machine_links\" $marker"
  [ -z "$uv_links" ] || echo "export UV_FIND_LINKS=\"$uv_links\" $marker"
  # SkyPilot gives every cluster a fresh HOME; keep pip's cache in the user's own
  # (like SkyPilot's UV_CACHE_DIR) so a recovery does not download torch again.
  echo "export PIP_CACHE_DIR=\"$uhome/.cache/pip\" $marker"
} >> "$uhome/.profile"
chown "$U:" "$uhome/.profile"

# -- Slurm -----------------------------------------------------------------------
# Several slurmd on one machine (Debian's slurm-wlm is built with multiple-slurmd
# support): one NodeName per node, NodeAddr 127.0.0.<i>, its own Port, and %n
# (the node's name) in the slurmd spool, pid and log paths; `slurmd -N <name>`.
# The first node is this host's name (it resolves to 127.0.0.1 here); the others get
# an /etc/hosts line and their own host name (a UTS namespace per slurmd), because
# SkyPilot's node runner resolves node *names*, not NodeAddr, for SKYPILOT_NODE_IPS
# (sky/skylet/executor/slurm.py, _get_job_node_ips: socket.gethostbyname of each name
# in SLURM_JOB_NODELIST) and finds its own node by its host name's address
# (_get_ip_address) among the cluster IPs, which come from NodeAddr
# (sky/adaptors/slurm.py, get_job_nodes).
n_nodes="$SUPERVISE_SLURM_NODES"
[[ "$n_nodes" =~ ^[1-9]$ ]] || { echo "up.sh: SUPERVISE_SLURM_NODES=$n_nodes: give 1 to 9 nodes" >&2; exit 1; }
host="$(hostname -s)"
[ "$(getent hosts "$host" | awk '{print $1}' | head -1)" = 127.0.0.1 ] || {
  echo "up.sh: $host must resolve to 127.0.0.1 (SkyPilot's node runner finds its node by that address)" >&2; exit 1; }
nodes=("$host")
for i in $(seq 2 "$n_nodes"); do nodes+=("$host-n$i"); done
drop_host_lines
for i in $(seq 2 "$n_nodes"); do echo "127.0.0.$i ${nodes[$((i - 1))]} $HOSTS_MARKER" >> /etc/hosts; done
mem_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 8 / 10 / n_nodes ))
slurmd_port=${SUPERVISE_SLURMD_PORT:-6818}
cat > "$SLURM_CONF" <<EOF
# Single-machine Slurm for tests (infra/slurm/up.sh): $n_nodes node(s) on one host. No munge: auth/none.
ClusterName=supervise
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
AuthType=auth/none
CredType=cred/none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SlurmctldPort=${SUPERVISE_SLURMCTLD_PORT:-6817}
StateSaveLocation=$S/slurm/state
SlurmdSpoolDir=$S/slurm/spool/%n
SlurmctldPidFile=$S/slurm/slurmctld.pid
SlurmdPidFile=$S/slurm/slurmd-%n.pid
SlurmctldLogFile=$S/slurm/slurmctld.log
SlurmdLogFile=$S/slurm/slurmd-%n.log
# The nodes advertise SUPERVISE_SLURM_CPUS, which may be more than the machine has.
SlurmdParameters=config_overrides
ReturnToService=2
KillWait=5
MinJobAge=60
InactiveLimit=0
EOF
for i in $(seq 1 "$n_nodes"); do
  echo "NodeName=${nodes[$((i - 1))]} NodeAddr=127.0.0.$i Port=$((slurmd_port + i - 1)) CPUs=$SUPERVISE_SLURM_CPUS RealMemory=$mem_mb State=UNKNOWN" >> "$SLURM_CONF"
done
echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=1-00:00:00 DefaultTime=1-00:00:00 State=UP" >> "$SLURM_CONF"
chmod 644 "$SLURM_CONF"
export SLURM_CONF
for f in "$S"/slurm/slurmd*.pid; do stop_pidfile "$f"; done  # restart: the config may have changed
stop_pidfile "$S/slurm/slurmctld.pid"
slurmctld -f "$SLURM_CONF"
own_names=1
if [ "$n_nodes" -gt 1 ] && ! unshare --uts true 2>/dev/null; then
  own_names=0
  echo "up.sh: warning: cannot give nodes 2..$n_nodes their own host name (unshare --uts needs CAP_SYS_ADMIN): a job whose allocation leaves out node $host fails in SkyPilot's node runner" >&2
fi
for n in "${nodes[@]}"; do
  install -d -m 755 "$S/slurm/spool/$n"
  if [ "$n" = "$host" ] || [ "$own_names" = 0 ]; then
    slurmd -f "$SLURM_CONF" -N "$n"
  else
    # Its own host name, as a machine of its own has: SkyPilot's node runner finds its node
    # by gethostbyname(gethostname()) among the allocation's NodeAddr (sky/skylet/executor/
    # slurm.py, _get_ip_address), so a job on nodes 3 and 4 must not see this host's name.
    unshare --uts sh -c "hostname '$n' && exec slurmd -f '$SLURM_CONF' -N '$n'"
  fi
done
up_nodes() { sinfo -h -N -o '%N %T' 2>/dev/null | awk '$2 ~ /^(idle|mixed|mix|allocated|alloc)$/' | sort -u | wc -l; }
for _ in $(seq 60); do [ "$(up_nodes)" -ge "$n_nodes" ] && break; sleep 1; done
[ "$(up_nodes)" -ge "$n_nodes" ] || {
  echo "up.sh: $(up_nodes) of $n_nodes Slurm nodes up; see $S/slurm/*.log" >&2; sinfo -N >&2 || true; exit 1; }
phase "slurmctld + $n_nodes slurmd (nodes ${nodes[*]} up)"

# -- sshd on loopback: the login node ----------------------------------------------
[ -f "$S/ssh/host_ed25519" ] || ssh-keygen -q -t ed25519 -N '' -f "$S/ssh/host_ed25519"
[ -f "$H/.ssh/localslurm" ] || ssh-keygen -q -t ed25519 -N '' -f "$H/.ssh/localslurm"
uhome_ssh="$(getent passwd "$U" | cut -d: -f6)/.ssh"  # sshd's StrictModes rejects keys under /tmp
install -d -m 700 -o "$U" "$uhome_ssh"
install -m 600 -o "$U" "$H/.ssh/localslurm.pub" "$uhome_ssh/authorized_keys"
cat > "$S/ssh/sshd_config" <<EOF
Port $P
ListenAddress 127.0.0.1
HostKey $S/ssh/host_ed25519
PidFile $S/ssh/sshd.pid
AuthorizedKeysFile .ssh/authorized_keys
AllowUsers $U
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
PermitRootLogin no
MaxSessions 100
MaxStartups 100:30:200
SetEnv SLURM_CONF=$SLURM_CONF
Subsystem sftp internal-sftp
EOF
mkdir -p /run/sshd && chmod 755 /run/sshd
stop_pidfile "$S/ssh/sshd.pid"
/usr/sbin/sshd -f "$S/ssh/sshd_config" -E "$S/ssh/sshd.log"
ssh_opts=(-o BatchMode=yes -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR -i "$H/.ssh/localslurm" -p "$P")
for _ in $(seq 20); do
  ssh "${ssh_opts[@]}" "$U@127.0.0.1" 'sinfo -h -o %P' >/dev/null 2>&1 && break
  sleep 0.5
done
ssh "${ssh_opts[@]}" "$U@127.0.0.1" 'command -v curl; sinfo -h -o %P' >&2
phase "sshd on 127.0.0.1:$P (login node for $U)"

# -- SkyPilot: ~/.slurm/config, ~/.sky/config.yaml, API server ------------------------
cat > "$H/.slurm/config" <<EOF
Host $SUPERVISE_SLURM_CLUSTER
    HostName 127.0.0.1
    Port $P
    User $U
    IdentityFile $H/.ssh/localslurm
    StrictHostKeyChecking no
    UserKnownHostsFile /dev/null
EOF
cat > "$H/.sky/config.yaml" <<EOF
allowed_clouds: [slurm]
jobs:
  controller:
    consolidation_mode: true  # the jobs controller runs in the local API server
EOF
cd "$H"
# The controller's internet probe goes to loopback (see sky_offline/sitecustomize.py).
# `sky api start` gives up after 60 s (sky/server/common.py, WAIT_APISERVER_START_TIMEOUT_SEC)
# while the server it spawned keeps starting; on a loaded machine that takes longer: wait for it.
HOME="$H" PYTHONPATH="$here/sky_offline${PYTHONPATH:+:$PYTHONPATH}" \
  SUPERVISE_SKY_NETWORK_PROBE="http://127.0.0.1:46580/api/health" \
  sky api start >"$S/sky-api-start.log" 2>&1 || {
    for _ in $(seq 120); do curl -sf http://127.0.0.1:46580/api/health >/dev/null && break; sleep 2; done
    curl -sf http://127.0.0.1:46580/api/health >/dev/null || { cat "$S/sky-api-start.log" >&2; exit 1; }
  }
HOME="$H" sky check slurm >"$S/sky-check.log" 2>&1 || true
grep -qi "slurm.*enabled\|enabled.*slurm" "$S/sky-check.log" || { cat "$S/sky-check.log" >&2; echo "up.sh: sky check slurm is not green" >&2; exit 1; }
phase "sky api start + sky check slurm"
echo "up.sh: ready. \`source $here/env.sh\` for a shell on it; \`$here/down.sh\` to tear down."
