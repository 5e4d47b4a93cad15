#!/usr/bin/env bash
# Install the Debian packages a single-machine Slurm + loopback sshd needs.
# Idempotent: does nothing when the binaries are already there. Needs root.
set -euo pipefail
need=()
command -v slurmctld >/dev/null || need+=(slurmctld)
command -v slurmd >/dev/null || need+=(slurmd)
command -v sbatch >/dev/null || need+=(slurm-client)
command -v /usr/sbin/sshd >/dev/null || need+=(openssh-server)
command -v ssh >/dev/null || need+=(openssh-client)
command -v rsync >/dev/null || need+=(rsync)
command -v sudo >/dev/null || need+=(sudo)
command -v curl >/dev/null || need+=(curl)
if [ ${#need[@]} -eq 0 ]; then exit 0; fi
export DEBIAN_FRONTEND=noninteractive
# Services must not start from the package scripts: we run our own daemons.
printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
trap 'rm -f /usr/sbin/policy-rc.d' EXIT
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
