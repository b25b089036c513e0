#!/usr/bin/env bash
# Train a config on a Cloud TPU VM slice: create it (or a queued resource) unless it exists,
# copy this project to every worker and install it, run `moe train` on all workers at once
# with their output streamed here, and delete the slice afterwards when asked.
#
#   launch/tpu_vm.sh [--dry-run] --name NAME --zone ZONE [--project ID] [--accelerator v5p-32]
#                    [--version RUNTIME] [--queued] [--spot] [--bucket gs://BUCKET [--mount]]
#                    [--run-dir DIR] [--delete-after] CONFIG [OVERRIDES...]
#   launch/tpu_vm.sh [--dry-run] --delete --name NAME --zone ZONE [--project ID] [--queued]
#
# Every worker runs the same command; MOE_DISTRIBUTED=auto makes `moe train` join the slice's
# processes through jax.distributed (worker ids and addresses come from the TPU metadata).
# Multi-host runs need one run directory every worker sees: with --bucket it is
# gs://BUCKET/runs/NAME, written directly (Orbax and moe/storage.py speak gs://; no mount);
# --mount instead mounts the bucket with gcsfuse at ~/moe/runs and uses runs/NAME under it.
set -euo pipefail
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() { sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }

NAME="" ZONE="" PROJECT="" ACCELERATOR="v5p-8" VERSION="v2-alpha-tpuv5" QUEUED=0 SPOT=0
BUCKET="" MOUNT=0 RUN_DIR="" DELETE_AFTER=0 DELETE_ONLY=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY_RUN=1; shift ;;
    --name) need_value "$@"; NAME="$2"; shift 2 ;;
    --zone) need_value "$@"; ZONE="$2"; shift 2 ;;
    --project) need_value "$@"; PROJECT="$2"; shift 2 ;;
    --accelerator) need_value "$@"; ACCELERATOR="$2"; shift 2 ;;
    --version) need_value "$@"; VERSION="$2"; shift 2 ;;
    --queued) QUEUED=1; shift ;;
    --spot) SPOT=1; shift ;;
    --bucket) need_value "$@"; BUCKET="$2"; shift 2 ;;
    --mount) MOUNT=1; shift ;;
    --run-dir) need_value "$@"; RUN_DIR="$2"; shift 2 ;;
    --delete-after) DELETE_AFTER=1; shift ;;
    --delete) DELETE_ONLY=1; shift ;;
    -h|--help) usage 0 ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) break ;;
  esac
done
[[ -n "$NAME" ]] || die "--name is required (the TPU VM or queued resource)"
[[ -n "$ZONE" ]] || die "--zone is required, e.g. --zone us-east5-a"
[[ "$NAME" =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] || die "--name '$NAME': lowercase letters, digits and dashes"

WHERE=(--zone "$ZONE")
[[ -n "$PROJECT" ]] && WHERE+=(--project "$PROJECT")
TPU=(gcloud compute tpus tpu-vm)
QR=(gcloud compute tpus queued-resources)

delete_slice() {
  if [[ "$QUEUED" == 1 ]]; then
    run "${QR[@]}" delete "$NAME" "${WHERE[@]}" --force --quiet
  else
    run "${TPU[@]}" delete "$NAME" "${WHERE[@]}" --quiet
  fi
}

if [[ "$DELETE_ONLY" == 1 ]]; then
  delete_slice
  exit 0
fi

[[ $# -ge 1 ]] || usage 2
CONFIG="$(project_path "$1")"; shift
check_overrides "$@"
if [[ -n "$BUCKET" ]]; then
  [[ "$BUCKET" =~ ^gs://[a-z0-9][-_.a-z0-9]*/?$ ]] || die "--bucket must look like gs://BUCKET, got '$BUCKET'"
  BUCKET="${BUCKET%/}"
fi
[[ "$MOUNT" == 0 || -n "$BUCKET" ]] || die "--mount needs --bucket gs://BUCKET"
if [[ -n "$BUCKET" && "$MOUNT" == 0 ]]; then
  RUN_DIR="${RUN_DIR:-$BUCKET/runs/$NAME}"
else
  RUN_DIR="${RUN_DIR:-runs/$NAME}"
fi

# --- create or reuse the slice
if [[ "$DRY_RUN" == 1 ]]; then
  echo "+ $(quote "${TPU[@]}" describe "$NAME" "${WHERE[@]}") # dry run: taken as absent"
  EXISTS=0
elif "${TPU[@]}" describe "$NAME" "${WHERE[@]}" --format='value(state)' > /dev/null 2>&1; then
  EXISTS=1
  echo "reusing TPU VM $NAME"
else
  EXISTS=0
fi
if [[ "$EXISTS" == 0 ]]; then
  EXTRA=()
  [[ "$SPOT" == 1 ]] && EXTRA+=(--spot)
  if [[ "$QUEUED" == 1 ]]; then
    run "${QR[@]}" create "$NAME" --node-id "$NAME" "${WHERE[@]}" --accelerator-type "$ACCELERATOR" \
      --runtime-version "$VERSION" "${EXTRA[@]}"
    if [[ "$DRY_RUN" == 1 ]]; then
      echo "+ (wait until $(quote "${QR[@]}" describe "$NAME" "${WHERE[@]}") says ACTIVE)"
    else
      until [[ "$("${QR[@]}" describe "$NAME" "${WHERE[@]}" --format='value(state.state)')" == ACTIVE ]]; do
        echo "waiting for queued resource $NAME to become ACTIVE..."; sleep 30
      done
    fi
  else
    run "${TPU[@]}" create "$NAME" "${WHERE[@]}" --accelerator-type "$ACCELERATOR" --version "$VERSION" "${EXTRA[@]}"
  fi
fi

# --- copy and install the project on every worker
ARCHIVE="${TMPDIR:-/tmp}/moe-src-$NAME.tgz"
run tar -C "$PROJECT_ROOT" --exclude=./.venv --exclude=./runs --exclude=./.git -czf "$ARCHIVE" .
run "${TPU[@]}" scp "$ARCHIVE" "$NAME:moe-src.tgz" "${WHERE[@]}" --worker=all
SETUP="mkdir -p ~/moe && tar -xzf ~/moe-src.tgz -C ~/moe && cd ~/moe && python3 -m venv .venv"
SETUP+=" && .venv/bin/pip install -q -e '.[tpu]'"
if [[ "$MOUNT" == 1 ]]; then
  SETUP+=" && mkdir -p ~/moe/runs && (mountpoint -q ~/moe/runs || gcsfuse --implicit-dirs $(quote "${BUCKET#gs://}") ~/moe/runs)"
fi
run "${TPU[@]}" ssh "$NAME" "${WHERE[@]}" --worker=all --command "$SETUP"

# --- train on all workers at once; output of every worker streams here
TRAIN="cd ~/moe && MOE_DISTRIBUTED=auto .venv/bin/moe train $(quote "$CONFIG" --run-dir "$RUN_DIR" --no-progress "$@")"
STATUS=0
run "${TPU[@]}" ssh "$NAME" "${WHERE[@]}" --worker=all --command "$TRAIN" || STATUS=$?

if [[ "$DELETE_AFTER" == 1 ]]; then
  delete_slice
fi
exit "$STATUS"
