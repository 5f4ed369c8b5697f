#!/usr/bin/env bash
# Submits a vidbatch run to a Ray cluster as a Ray job, with launch/runtime_env.yaml.
#
#   RAY_ADDRESS=http://127.0.0.1:8265 launch/submit-job.sh CONFIG INPUT OUTPUT [vidbatch run options...]
#   RAY_ADDRESS=http://127.0.0.1:8265 launch/submit-job.sh configs/default.yaml \
#       'pipe:aws s3 cp s3://bucket/part-{000000..000999}.tar -' /mnt/shared/out --set edit.steps=30
#
# The job's driver runs on the head node and joins the cluster through the RAY_ADDRESS Ray gives it:
# one vidbatch worker per GPU of the cluster. OUTPUT must be on the shared filesystem. The command
# follows the job's log; Ctrl-C stops following, not the job (`ray job stop ID` does). Submitting the
# same command again continues a run: finished shards are skipped. Extra `ray job submit` options go
# in RAY_SUBMIT_ARGS, e.g. RAY_SUBMIT_ARGS=--no-wait; RAY_RUNTIME_ENV names another runtime env file.
set -euo pipefail

if [ $# -lt 3 ]; then
  echo "usage: RAY_ADDRESS=http://HEAD:8265 $0 CONFIG INPUT OUTPUT [vidbatch run options...]" >&2
  exit 2
fi
: "${RAY_ADDRESS:?set RAY_ADDRESS to the job API of the cluster, e.g. http://127.0.0.1:8265 (ray dashboard)}"
cd "$(dirname "$0")/.."  # runtime_env.yaml's working_dir is the repository root

config=$1 input=$2 output=$3
shift 3
# `ray job submit` quotes each word for the shell that runs the entrypoint (brace patterns and pipe:
# commands arrive intact). python -m: the job's working directory (this checkout) comes first.
# shellcheck disable=SC2086  # RAY_SUBMIT_ARGS is a list of options on purpose
exec ray job submit --address "$RAY_ADDRESS" --runtime-env "${RAY_RUNTIME_ENV:-launch/runtime_env.yaml}" \
  --submission-id "vidbatch-$(date +%Y%m%d-%H%M%S)" ${RAY_SUBMIT_ARGS:-} -- \
  python -m vidbatch.cli run "$config" --input "$input" --output "$output" "$@"
