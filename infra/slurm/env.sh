# `source infra/slurm/env.sh` puts a shell on the local Slurm set up by up.sh:
# `sky`, `supervise start --infra slurm`, `sinfo`, `squeue`, `scancel` then
# talk to it (HOME points at the isolated SkyPilot home).
_here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
. "$_here/common.sh"
export SLURM_CONF HOME="$SUPERVISE_SLURM_SKY_HOME"
unset _here
