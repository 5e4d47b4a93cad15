#!/usr/bin/env bash
# Tear down what up.sh started: the SkyPilot API server (and the managed-job
# controllers it runs), every Slurm job, every slurmd, slurmctld, sshd, and every process
# left by the login-node user. Removes the state folder; the user and the Debian
# packages stay. Safe to run twice, or after a failed up.sh.
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
. "$here/common.sh"
S="$SUPERVISE_SLURM_DIR"; U="$SUPERVISE_SLURM_USER"; H="$SUPERVISE_SLURM_SKY_HOME"
export SLURM_CONF

if [ -d "$H/.sky" ] && command -v sky >/dev/null; then
  (cd "$H" && HOME="$H" timeout 60 sky api stop >/dev/null 2>&1) || true
fi
if [ -f "$SLURM_CONF" ] && command -v scancel >/dev/null; then
  timeout 10 scancel --user="$U" 2>/dev/null || true
  timeout 10 scancel --user=root 2>/dev/null || true
fi
# Without `sky` on PATH (or if it failed): the API server and its controllers run with HOME=$H.
for p in /proc/[0-9]*; do
  pid="${p#/proc/}"
  [ "$pid" = $$ ] && continue
  tr '\0' '\n' <"$p/environ" 2>/dev/null | grep -qx "HOME=$H" && kill -KILL "$pid" 2>/dev/null
done
sleep 1
stop_pidfile "$S/ssh/sshd.pid"
for f in "$S"/slurm/slurmd*.pid; do stop_pidfile "$f"; done
stop_pidfile "$S/slurm/slurmctld.pid"
# Whatever the login-node user still runs (skylet, ray, a trainer) was started by us.
if id "$U" >/dev/null 2>&1; then
  pids="$(ps -u "$U" -o pid= 2>/dev/null | tr '\n' ' ')"
  [ -n "${pids// }" ] && kill -KILL $pids 2>/dev/null || true
fi
uhome="$(getent passwd "$U" 2>/dev/null | cut -d: -f6)"
[ -n "$uhome" ] && [ -f "$uhome/.profile" ] && sed -i '/# supervise-slurm/d' "$uhome/.profile"
# SkyPilot's per-cluster homes and caches of the user: the next run starts like a fresh machine.
[ -n "$uhome" ] && rm -rf "$uhome"/.sky* "$uhome"/sky_* "/tmp/uv_cache_$(id -u "$U" 2>/dev/null)" 2>/dev/null
drop_host_lines 2>/dev/null || true
[ "${SUPERVISE_SLURM_KEEP_STATE:-0}" = 1 ] || rm -rf "$S"
echo "down.sh: stopped"
