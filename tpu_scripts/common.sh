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
RUNTIME="${TPT_RUNTIME:-}"  # empty: chosen from the accelerator type (runtime_for_accelerator)
WORKERS=""  # hosts per slice; empty: from the accelerator type, else asked of gcloud
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
      --version | --runtime-version) RUNTIME="${2:?$1 needs a value}"; shift 2 ;;
      --workers) WORKERS="${2:?--workers needs a number}"; shift 2 ;;
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
  [[ -z "$WORKERS" || "$WORKERS" =~ ^[1-9][0-9]*$ ]] ||
    die "--workers must be a positive integer, got '$WORKERS'"
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

# The TPU software version Google lists for JAX on each generation (cloud.google.com/tpu/docs/
# runtimes): v4 and older share the plain Ubuntu image; v5e, v5p and v6e have their own.
runtime_for_accelerator() {
  case "$1" in
    v2-* | v3-* | v4-*) echo tpu-ubuntu2204-base ;;
    v5litepod-* | v5e-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    *) return 1 ;;
  esac
}

# Hosts (TPU VM workers) in one slice of an accelerator type. v2/v3/v4/v5p names count
# TensorCores, 2 per chip and 4 chips per host (v5p-128 = 64 chips = 16 hosts); v5e and v6e
# names count chips, 8 on the one host of a -8 slice and 4 per host beyond (v6e-16 = 4 hosts).
hosts_for_accelerator() {
  [[ "$1" =~ ^(v[0-9]+[a-z]*)-([1-9][0-9]*)$ ]] || return 1
  local generation="${BASH_REMATCH[1]}" count="${BASH_REMATCH[2]}"
  case "$generation" in
    v2 | v3 | v4 | v5p) echo $(((count + 7) / 8)) ;;
    v5litepod | v5e | v6e) if ((count <= 8)); then echo 1; else echo $((count / 4)); fi ;;
    *) return 1 ;;
  esac
}

# Sets WORKERS (hosts per slice) unless --workers gave it: from --accelerator-type, else from the
# first slice's description (printed, not run, with --dry-run, which then needs one of the two).
resolve_workers() {
  [[ -z "$WORKERS" ]] || return 0
  if [[ -n "$ACCELERATOR" ]]; then
    WORKERS="$(hosts_for_accelerator "$ACCELERATOR")" ||
      die "cannot tell the hosts of --accelerator-type '$ACCELERATOR': give --workers N"
    return 0
  fi
  local describe=(gcloud compute tpus tpu-vm describe "$(node_names | head -n 1)"
    --project="$PROJECT" --zone="$ZONE" --format="value(acceleratorType)")
  run "${describe[@]}"
  ((!DRY_RUN)) || die "--dry-run needs --accelerator-type or --workers to list every worker"
  ACCELERATOR="$("${describe[@]}")" || die "cannot describe $(node_names | head -n 1): give --workers N"
  ACCELERATOR="${ACCELERATOR##*/}"  # some gcloud versions print the full resource path
  WORKERS="$(hosts_for_accelerator "$ACCELERATOR")" ||
    die "cannot tell the hosts of accelerator type '$ACCELERATOR': give --workers N"
}

# One word as the shell reads it: plain if it is safe, else in single quotes.
quote() {
  if [[ "$1" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

# A run name names its files on every worker (~/tpt_logs/RUN.log, .exit, .pid): one file name.
# Quoting (printf %q) keeps any other character literal in the remote shell.
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

# The remote shell words that set `f` to a run's path prefix on a worker: ~/tpt_logs/RUN, whose
# .log is the output, .pid "WRAPPER TPT" (the two process ids) and .exit the exit status of tpt.
run_files() {
  printf 'f=~/tpt_logs/%q' "$1"
}

# A worker's view of a run, as one line `tpt-state: STATE STATUS WORKER` (relaunch.sh parses it):
# done (exit 0; for train and think also "tpt: run complete" in the log, else a SIGTERM stop,
# `stopped`), failed (exit status non-zero), running, or none (no exit status and no process).
# The sub-command is the second argument, or else read from the worker's RUN.cmd (launch.sh writes
# it); where neither tells it, exit 0 counts as done only with the completion line.
# WORKER is the TPU VM metadata's agent-worker-number, `?` where the metadata server is unreachable.
run_state_probe() {
  local run="$1" subcommand="${2:-}" known
  # shellcheck disable=SC2016  # expanded on the worker
  known='k=$(cat "$f.cmd" 2>/dev/null || true)'
  [[ -n "$subcommand" ]] && known="k=$(printf '%q' "$subcommand")"
  local complete="{ [ -n \"\$k\" ] && [ \"\$k\" != train ] && [ \"\$k\" != think ]; } || grep -q '^tpt: run complete' \"\$f.log\""
  local steps=(
    "$(run_files "$run")"
    "$known"
    "w=\$(curl -sf -m 5 -H 'Metadata-Flavor: Google' http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number || echo '?')"
    "if [ -f \"\$f.exit\" ]; then s=\$(cat \"\$f.exit\"); if [ \"\$s\" != 0 ]; then echo \"tpt-state: failed \$s \$w\"; elif $complete; then echo \"tpt-state: done 0 \$w\"; else echo \"tpt-state: stopped 0 \$w\"; fi; elif [ -f \"\$f.pid\" ] && read -r _ c < \"\$f.pid\" && kill -0 \"\$c\" 2>/dev/null; then echo \"tpt-state: running - \$w\"; else echo \"tpt-state: none - \$w\"; fi"
  )
  local joined
  joined="$(printf '%s; ' "${steps[@]}")"
  echo "${joined%; }"
}

# Sets COMMIT to the full hash of --commit (default HEAD) in the checkout $1, so that a branch or
# HEAD names one fixed commit for every worker and recreation (and a name with '/' never reaches
# a file name). With --repo ($2 not empty) a revision the checkout lacks is left as given, for the
# workers' clone to resolve.
resolve_commit() {
  local checkout="$1" repo="$2" hash
  if hash="$(git -C "$checkout" rev-parse --verify --quiet "${COMMIT:-HEAD}^{commit}" 2>/dev/null)"; then
    COMMIT="$hash"
  elif [[ -z "$COMMIT" ]]; then
    die "$checkout is not a git checkout: give --commit and --repo"
  elif [[ -z "$repo" ]]; then
    die "--commit '$COMMIT' is not a commit of $checkout"
  fi
}
