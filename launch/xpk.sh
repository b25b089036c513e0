#!/usr/bin/env bash
# Train a config as a GKE workload through xpk: xpk builds an image from --base-docker-image
# with this project copied in, and runs `moe train` on every host of every slice.
#
#   launch/xpk.sh [--dry-run] --cluster CLUSTER --workload NAME --tpu-type v5p-128
#                 [--num-slices N] [--project ID] [--zone ZONE] [--base-docker-image IMAGE]
#                 [--bucket gs://BUCKET | --run-dir DIR] [--follow] CONFIG [OVERRIDES...]
#   launch/xpk.sh [--dry-run] --delete --cluster CLUSTER --workload NAME [--project ID] [--zone ZONE]
#
# Multi-host settings reach `moe train` through the environment: MOE_DISTRIBUTED=auto, and the
# TPU_WORKER_* / MEGASCALE_* variables GKE and xpk set on every pod. Pods' own disks are lost,
# so the run directory must be one every host sees: --bucket gs://BUCKET writes to
# gs://BUCKET/runs/WORKLOAD directly (or pass --run-dir gs://... or a mounted shared volume).
set -euo pipefail
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() { sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }

CLUSTER="" WORKLOAD="" TPU_TYPE="" NUM_SLICES=1 PROJECT="" ZONE="" IMAGE="python:3.11"
BUCKET="" RUN_DIR="" FOLLOW=0 DELETE_ONLY=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY_RUN=1; shift ;;
    --cluster) need_value "$@"; CLUSTER="$2"; shift 2 ;;
    --workload) need_value "$@"; WORKLOAD="$2"; shift 2 ;;
    --tpu-type) need_value "$@"; TPU_TYPE="$2"; shift 2 ;;
    --num-slices) need_value "$@"; NUM_SLICES="$2"; shift 2 ;;
    --project) need_value "$@"; PROJECT="$2"; shift 2 ;;
    --zone) need_value "$@"; ZONE="$2"; shift 2 ;;
    --base-docker-image) need_value "$@"; IMAGE="$2"; shift 2 ;;
    --bucket) need_value "$@"; BUCKET="$2"; shift 2 ;;
    --run-dir) need_value "$@"; RUN_DIR="$2"; shift 2 ;;
    --follow) FOLLOW=1; shift ;;
    --delete) DELETE_ONLY=1; shift ;;
    -h|--help) usage 0 ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) break ;;
  esac
done
[[ -n "$CLUSTER" ]] || die "--cluster is required (an xpk cluster)"
[[ -n "$WORKLOAD" ]] || die "--workload is required (the workload's name)"
[[ "$WORKLOAD" =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] || die "--workload '$WORKLOAD': lowercase letters, digits and dashes"

WHERE=(--cluster "$CLUSTER")
[[ -n "$PROJECT" ]] && WHERE+=(--project "$PROJECT")
[[ -n "$ZONE" ]] && WHERE+=(--zone "$ZONE")

if [[ "$DELETE_ONLY" == 1 ]]; then
  run xpk workload delete --workload "$WORKLOAD" "${WHERE[@]}"
  exit 0
fi

[[ -n "$TPU_TYPE" ]] || die "--tpu-type is required, e.g. --tpu-type v5p-128"
[[ "$NUM_SLICES" =~ ^[1-9][0-9]*$ ]] || die "--num-slices must be a positive integer, got '$NUM_SLICES'"
[[ $# -ge 1 ]] || usage 2
CONFIG="$(project_path "$1")"; shift
check_overrides "$@"
if [[ -n "$BUCKET" ]]; then
  [[ "$BUCKET" =~ ^gs://[a-z0-9][-_.a-z0-9]*/?$ ]] || die "--bucket must look like gs://BUCKET, got '$BUCKET'"
  RUN_DIR="${RUN_DIR:-${BUCKET%/}/runs/$WORKLOAD}"
fi
RUN_DIR="${RUN_DIR:-runs/$WORKLOAD}"

# xpk copies --script-dir into the image and runs the command from there on every host
COMMAND="pip install -q -e '.[tpu]' && MOE_DISTRIBUTED=auto moe train $(quote "$CONFIG" --run-dir "$RUN_DIR" --no-progress "$@")"
run xpk workload create --workload "$WORKLOAD" "${WHERE[@]}" --tpu-type "$TPU_TYPE" \
  --num-slices "$NUM_SLICES" --base-docker-image "$IMAGE" --script-dir "$PROJECT_ROOT" --command "$COMMAND"

if [[ "$FOLLOW" == 1 ]]; then
  run kubectl logs --follow --prefix --max-log-requests=1000 -l "jobset.sigs.k8s.io/jobset-name=$WORKLOAD"
else
  echo "follow the logs: $(quote kubectl logs --follow --prefix --max-log-requests=1000 -l "jobset.sigs.k8s.io/jobset-name=$WORKLOAD")"
fi
