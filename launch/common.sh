# Shared by the launch scripts (sourced, not run): dry-run aware command runner, quoting, errors.
# shellcheck shell=bash

PROJECT_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DRY_RUN=0

# quote ARGS...: one shell-safe line that runs ARGS (single quotes where needed)
quote() {
  local out=() arg q="'"
  for arg in "$@"; do
    if [[ "$arg" =~ ^[-A-Za-z0-9_./:=@%+,]+$ ]]; then
      out+=("$arg")
    else
      out+=("$q${arg//$q/$q\\$q$q}$q")
    fi
  done
  echo "${out[*]}"
}

# run ARGS...: run a command, or print it with --dry-run
run() {
  if [[ "$DRY_RUN" == 1 ]]; then
    echo "+ $(quote "$@")"
  else
    "$@"
  fi
}

die() {
  echo "$(basename "$0"): $*" >&2
  exit 2
}

# need_value OPTION VALUE: an option that takes a value got one
need_value() {
  [[ $# -ge 2 && -n "$2" && "$2" != --* ]] || die "$1 needs a value"
}

# project_path FILE: FILE relative to the project root (remote workers have the project there)
project_path() {
  local abs
  [[ -f "$1" ]] || die "config file not found: $1"
  abs="$(cd "$(dirname "$1")" && pwd)/$(basename "$1")"
  [[ "$abs" == "$PROJECT_ROOT"/* ]] || die "config $1 must be inside the project ($PROJECT_ROOT): it is copied to the workers"
  echo "${abs#"$PROJECT_ROOT"/}"
}

# check_overrides ARGS...: every override looks like section.key=value
check_overrides() {
  local o
  for o in "$@"; do
    [[ "$o" == *=* && "$o" != -* ]] || die "'$o' is not an override (section.key=value); options go before the config"
  done
}
