#!/usr/bin/env bash
# Streams one worker's log, or collects every worker's logs into a local folder.
# shellcheck source=tpu_scripts/common.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'USAGE'
usage: logs.sh --project P --zone Z --name N [--run RUN] [--worker W | --collect DIR] [--slices K]

  --run RUN       log name given to launch.sh (default: train)
  --worker W      stream worker W of the first slice (default 0)
  --collect DIR   copy every worker's log to DIR/<node>/
USAGE
}

parse_common "$@"
require project zone name
RUN=train WORKER=0 COLLECT=""
set -- "${REST[@]+"${REST[@]}"}"
while (($#)); do
  case "$1" in
    --run) RUN="${2:?--run needs a value}"; shift 2 ;;
    --worker) WORKER="${2:?--worker needs a value}"; shift 2 ;;
    --collect) COLLECT="${2:?--collect needs a folder}"; shift 2 ;;
    *) die "unknown argument: $1" ;;
  esac
done

check_run_name "$RUN"
# The log's path is read by the worker's shell (ssh --command, and scp's remote side): quote the
# name (%q) so that it arrives as written; `~` stays unquoted to expand there, not here.
# shellcheck disable=SC2088
log="~/tpt_logs/$(printf '%q' "$RUN.log")"
if [[ -n "$COLLECT" ]]; then
  while read -r node; do
    run mkdir -p "$COLLECT/$node"
    run gcloud compute tpus tpu-vm scp "$node:$log" "$COLLECT/$node/" \
      --project="$PROJECT" --zone="$ZONE" --worker=all
  done < <(node_names)
else
  run gcloud compute tpus tpu-vm ssh "$(node_names | head -n 1)" --project="$PROJECT" \
    --zone="$ZONE" --worker="$WORKER" --command="tail -n 200 -f $log"
fi
