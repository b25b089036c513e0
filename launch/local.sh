#!/usr/bin/env bash
# Train a config on this machine: one process, or several joined by jax.distributed
# (multi-host code paths on one host; with --cpu-devices each process gets that many CPU devices).
#
#   launch/local.sh [--dry-run] [--run-dir DIR] [--processes N] [--cpu-devices D] [--port P] \
#                   CONFIG [OVERRIDES...]
#
# PYTHON picks the interpreter (default: python). Multi-process settings reach `moe train`
# through MOE_COORDINATOR_ADDRESS, MOE_NUM_PROCESSES and MOE_PROCESS_ID. Process i logs to
# RUN_DIR/process-i.log (process 0 also to the terminal).
set -euo pipefail
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() { sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }

RUN_DIR="" PROCESSES=1 CPU_DEVICES="" PORT=12355
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY_RUN=1; shift ;;
    --run-dir) need_value "$@"; RUN_DIR="$2"; shift 2 ;;
    --processes) need_value "$@"; PROCESSES="$2"; shift 2 ;;
    --cpu-devices) need_value "$@"; CPU_DEVICES="$2"; shift 2 ;;
    --port) need_value "$@"; PORT="$2"; shift 2 ;;
    -h|--help) usage 0 ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) break ;;
  esac
done
[[ $# -ge 1 ]] || usage 2
CONFIG="$1"; shift
[[ -f "$CONFIG" ]] || die "config file not found: $CONFIG"
check_overrides "$@"
[[ "$PROCESSES" =~ ^[1-9][0-9]*$ ]] || die "--processes must be a positive integer, got '$PROCESSES'"
RUN_DIR="${RUN_DIR:-runs/$(basename "$CONFIG" .yaml)}"

MOE=("${PYTHON:-python}" -m moe train "$CONFIG" --run-dir "$RUN_DIR" "$@")
ENV=()
if [[ -n "$CPU_DEVICES" ]]; then
  ENV+=(JAX_PLATFORMS=cpu "XLA_FLAGS=--xla_force_host_platform_device_count=$CPU_DEVICES")
fi

if [[ "$PROCESSES" == 1 ]]; then
  run env "${ENV[@]}" "${MOE[@]}"
  exit 0
fi

# each process's output: in the run directory, or beside it in runs/logs/ for a gs:// one
LOG_DIR="$RUN_DIR"
[[ "$RUN_DIR" == *://* ]] && LOG_DIR="runs/logs/$(basename "$RUN_DIR")"
run mkdir -p "$LOG_DIR"
PIDS=()
for ((i = 0; i < PROCESSES; i++)); do
  DIST=(MOE_COORDINATOR_ADDRESS="127.0.0.1:$PORT" MOE_NUM_PROCESSES="$PROCESSES" MOE_PROCESS_ID="$i")
  if [[ "$DRY_RUN" == 1 ]]; then
    echo "+ $(quote env "${ENV[@]}" "${DIST[@]}" "${MOE[@]}" --no-progress) > $(quote "$LOG_DIR/process-$i.log") 2>&1 &"
    continue
  fi
  if [[ "$i" == 0 ]]; then
    env "${ENV[@]}" "${DIST[@]}" "${MOE[@]}" --no-progress > >(tee "$LOG_DIR/process-$i.log") 2>&1 &
  else
    env "${ENV[@]}" "${DIST[@]}" "${MOE[@]}" --no-progress > "$LOG_DIR/process-$i.log" 2>&1 &
  fi
  PIDS+=($!)
done
[[ "$DRY_RUN" == 1 ]] && exit 0

# forward a stop to every process (each saves its part of the checkpoint), then wait for all
trap 'kill -TERM "${PIDS[@]}" 2>/dev/null || true' INT TERM
STATUS=0
for pid in "${PIDS[@]}"; do
  wait "$pid" || STATUS=$?
done
exit "$STATUS"
