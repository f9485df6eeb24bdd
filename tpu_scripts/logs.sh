#!/usr/bin/env bash
# Streams one worker's log, or collects every worker's log (and exit status) into a local folder.
# shellcheck source=tpu_scripts/common.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'USAGE'
usage: logs.sh --project P --zone Z --name N [--run RUN] [--worker W] [--slice S] [--slices K]
               [--collect DIR [--accelerator-type T | --workers N]] [--dry-run]

  --run RUN       log name given to launch.sh (default: train)
  --worker W      stream worker W (default 0) of slice S (default 0)
  --collect DIR   copy each worker's log to DIR/<node>/worker-<i>.log, one worker at a time
                  (gcloud copies from one worker per call); the worker count comes from
                  --workers, else --accelerator-type, else the slice's description
USAGE
}

parse_common "$@"
require project zone name
RUN=train WORKER=0 SLICE=0 COLLECT=""
set -- "${REST[@]+"${REST[@]}"}"
while (($#)); do
  case "$1" in
    --run) RUN="${2:?--run needs a value}"; shift 2 ;;
    --worker) WORKER="${2:?--worker needs a value}"; shift 2 ;;
    --slice) SLICE="${2:?--slice needs a value}"; shift 2 ;;
    --collect) COLLECT="${2:?--collect needs a folder}"; shift 2 ;;
    *) die "unknown argument: $1" ;;
  esac
done
[[ "$WORKER" =~ ^[0-9]+$ ]] || die "--worker must be a worker number, got '$WORKER'"
if [[ ! "$SLICE" =~ ^[0-9]+$ ]] || ((SLICE >= SLICES)); then
  die "--slice must be a number below --slices ($SLICES), got '$SLICE'"
fi

check_run_name "$RUN"
# The log's path is read by the worker's shell (ssh --command, and scp's remote side): quote the
# name (%q) so that it arrives as written; `~` stays unquoted to expand there, not here.
# shellcheck disable=SC2088
log="~/tpt_logs/$(printf '%q' "$RUN.log")"
if [[ -z "$COLLECT" ]]; then
  run gcloud compute tpus tpu-vm ssh "$(node_names | sed -n "$((SLICE + 1))p")" \
    --project="$PROJECT" --zone="$ZONE" --worker="$WORKER" --command="tail -n 200 -f $log"
  exit 0
fi

resolve_workers
missing=0
while read -r node; do
  run mkdir -p "$COLLECT/$node"
  for ((worker = 0; worker < WORKERS; worker++)); do
    # One worker failing to answer must not hide the others' logs: note it and go on.
    run gcloud compute tpus tpu-vm scp "$node:$log" "$COLLECT/$node/worker-$worker.log" \
      --project="$PROJECT" --zone="$ZONE" --worker="$worker" ||
      { echo "logs.sh: no log from $node worker $worker" >&2; missing=$((missing + 1)); }
  done
done < <(node_names)
((missing == 0)) || die "$missing of $((WORKERS * SLICES)) worker logs could not be copied"
