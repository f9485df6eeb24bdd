#!/usr/bin/env bash
# Shows the state of the queued resource or TPU VMs, and each worker's view of a run
# (`tpt-state: done|failed|stopped|running|none STATUS WORKER`, from launch.sh's files).
# shellcheck source=tpu_scripts/common.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  echo "usage: status.sh --project P --zone Z --name N [--queued] [--slices K] [--run RUN] [--dry-run]"
  echo "  --run RUN   the run name given to launch.sh (default: train)"
}

parse_common "$@"
require project zone name
RUN=train
set -- "${REST[@]+"${REST[@]}"}"
while (($#)); do
  case "$1" in
    --run) RUN="${2:?--run needs a value}"; shift 2 ;;
    *) die "unknown argument: $1" ;;
  esac
done
check_run_name "$RUN"

if ((QUEUED)); then
  run gcloud compute tpus queued-resources describe "$NAME" --project="$PROJECT" --zone="$ZONE" \
    --format="value(state.state)"
fi
while read -r node; do
  run gcloud compute tpus tpu-vm describe "$node" --project="$PROJECT" --zone="$ZONE" \
    --format="value(state,health)"
done < <(node_names)
# The sub-command (train and think print a completion line) is read from launch.sh's RUN.cmd.
ssh_all "$(run_state_probe "$RUN")"
