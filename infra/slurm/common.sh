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

# Kill processes by the pid in a pidfile, wait until gone (SIGKILL after 10 s).
stop_pidfile() {
  local f="$1" pid
  [ -f "$f" ] || return 0
  pid="$(cat "$f")"
  kill -TERM "$pid" 2>/dev/null || return 0
  for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
}
