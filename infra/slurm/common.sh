# Settings shared by up.sh, down.sh and env.sh (sourced, not run).
# Everything lives under one state folder so that down.sh can remove it whole.
SUPERVISE_SLURM_DIR="${SUPERVISE_SLURM_DIR:-/tmp/supervise-slurm}"
# The unprivileged user that plays the login node (and owns the Slurm jobs).
SUPERVISE_SLURM_USER="${SUPERVISE_SLURM_USER:-skyslurm}"
SUPERVISE_SLURM_SSH_PORT="${SUPERVISE_SLURM_SSH_PORT:-2222}"
# HOME of the SkyPilot client and API server: ~/.sky and ~/.slurm live here, so
# the caller's own ~/.sky (clouds, credentials, other API servers) is untouched.
SUPERVISE_SLURM_SKY_HOME="${SUPERVISE_SLURM_SKY_HOME:-$SUPERVISE_SLURM_DIR/home}"
# The Host alias in ~/.slurm/config: SkyPilot's name for the cluster (--infra slurm/<alias>).
SUPERVISE_SLURM_CLUSTER="${SUPERVISE_SLURM_CLUSTER:-localslurm}"
SLURM_CONF="$SUPERVISE_SLURM_DIR/slurm/slurm.conf"
# Slurm nodes on this one machine (each its own slurmd, node i on 127.0.0.i).
SUPERVISE_SLURM_NODES="${SUPERVISE_SLURM_NODES:-2}"
# CPUs each node advertises. More than the machine has (the default) lets jobs share
# nodes; exactly a job's request (4 for `cpus: 4+`) gives every job whole nodes of its own.
SUPERVISE_SLURM_CPUS="${SUPERVISE_SLURM_CPUS:-8}"
# Marks the /etc/hosts lines up.sh adds for nodes 2.. (down.sh removes them).
HOSTS_MARKER="# supervise-slurm-node"

# Kill processes by the pid in a pidfile, wait until gone (SIGKILL after 10 s).
stop_pidfile() {
  local f="$1" pid
  [ -f "$f" ] || return 0
  pid="$(cat "$f")"
  kill -TERM "$pid" 2>/dev/null || return 0
  for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
}

# Drop the lines up.sh added to /etc/hosts, rewriting the file in place (it may be a mount).
drop_host_lines() {
  local kept
  kept="$(grep -v -- "$HOSTS_MARKER" /etc/hosts || true)"
  printf '%s\n' "$kept" > /etc/hosts
}
