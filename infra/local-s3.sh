#!/usr/bin/env bash
# Start a local S3-compatible object store (SeaweedFS `weed mini`) on free loopback
# ports for the demo, tests, or users without a bucket. Prints the `export` lines
# for AWS_ENDPOINT_URL / AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_REGION and
# runs until Ctrl-C (then stops the server cleanly). Bucket: s3://supervise
#
#   infra/local-s3.sh [DATA_DIR]      # data kept in DATA_DIR (default: a temp dir, removed on exit)
#
# In another shell, paste the printed export lines, then e.g.
#   supervise checkpoints list s3://supervise/run1/checkpoint
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -x .venv/bin/python ] && [ -z "${VIRTUAL_ENV:-}" ]; then . .venv/bin/activate; fi
exec python -m supervisor.store.local_server "$@"
