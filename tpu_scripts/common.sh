#!/usr/bin/env bash
# Shared option parsing and command running for the tpu_scripts. Sourced, not run.
# Variables set here are used by the scripts that source it.
# shellcheck disable=SC2034
#
# Every script takes the same resource options; --dry-run prints each gcloud command (one per
# line, shell-quoted) instead of running it.

set -euo pipefail

PROJECT="${TPT_PROJECT:-}"
ZONE="${TPT_ZONE:-}"
NAME="${TPT_TPU_NAME:-}"
ACCELERATOR="${TPT_ACCELERATOR:-}"
RUNTIME="${TPT_RUNTIME:-v2-alpha-tpuv5}"
SLICES=1
SPOT=0
RESERVATION=0
QUEUED=0
DRY_RUN=0
REST=()
COMMAND=()  # the words after `--`: the tpt command of launch.sh and relaunch.sh

die() {
  echo "$(basename "$0"): error: $*" >&2
  exit 2
}

# Parses the shared options; words after `--` go to COMMAND, everything else to REST.
parse_common() {
  while (($#)); do
    case "$1" in
      --) shift; COMMAND=("$@"); break ;;
      --project) PROJECT="${2:?--project needs a value}"; shift 2 ;;
      --zone) ZONE="${2:?--zone needs a value}"; shift 2 ;;
      --name) NAME="${2:?--name needs a value}"; shift 2 ;;
      --accelerator-type) ACCELERATOR="${2:?--accelerator-type needs a value}"; shift 2 ;;
      --runtime-version) RUNTIME="${2:?--runtime-version needs a value}"; shift 2 ;;
      --slices) SLICES="${2:?--slices needs a value}"; shift 2 ;;
      --spot) SPOT=1; shift ;;
      --reservation) RESERVATION=1; shift ;;
      --queued) QUEUED=1; shift ;;
      --dry-run) DRY_RUN=1; shift ;;
      -h | --help) usage; exit 0 ;;
      *) REST+=("$1"); shift ;;
    esac
  done
  [[ "$SLICES" =~ ^[1-9][0-9]*$ ]] || die "--slices must be a positive integer, got '$SLICES'"
  ((SLICES == 1)) || QUEUED=1  # multi-slice needs a queued resource
  ((SPOT + RESERVATION < 2)) || die "--spot and --reservation exclude each other"
}

# Checks that the named options are set, naming the first that is not.
require() {
  local option
  for option in "$@"; do
    case "$option" in
      project) [[ -n "$PROJECT" ]] || die "missing --project (or TPT_PROJECT)" ;;
      zone) [[ -n "$ZONE" ]] || die "missing --zone (or TPT_ZONE)" ;;
      name) [[ -n "$NAME" ]] || die "missing --name (or TPT_TPU_NAME)" ;;
      accelerator) [[ -n "$ACCELERATOR" ]] || die "missing --accelerator-type (or TPT_ACCELERATOR), e.g. v5p-128" ;;
    esac
  done
}

# One word as the shell reads it: plain if it is safe, else in single quotes.
quote() {
  if [[ "$1" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

# A run name names its log file on every worker (~/tpt_logs/RUN.log): one file name. Quoting
# (printf %q) keeps any other character literal in the remote shell.
check_run_name() {
  [[ -n "$1" && "$1" != */* && "$1" != . && "$1" != .. ]] ||
    die "the run name (--run, default: the tpt sub-command) must be a file name without '/', got '$1'"
}

# Runs a command, or prints it (copy-pasteable) with --dry-run.
run() {
  if ((DRY_RUN)); then
    local line="" word
    for word in "$@"; do
      line+="${line:+ }$(quote "$word")"
    done
    echo "$line"
  else
    "$@"
  fi
}

# The TPU VM names: one per slice (multi-slice queued resources name them NAME-0, NAME-1, ...).
node_names() {
  if ((SLICES == 1)); then
    echo "$NAME"
  else
    local i
    for ((i = 0; i < SLICES; i++)); do
      echo "$NAME-$i"
    done
  fi
}

# ssh to every worker of every slice and run a command there.
ssh_all() {
  local command="$1" node
  while read -r node; do
    run gcloud compute tpus tpu-vm ssh "$node" --project="$PROJECT" --zone="$ZONE" \
      --worker=all --command="$command"
  done < <(node_names)
}
