#!/usr/bin/env bash
# Shows the state of the queued resource or TPU VM and of each worker's tpt processes.
# shellcheck source=tpu_scripts/common.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  echo "usage: status.sh --project P --zone Z --name N [--queued] [--slices K] [--dry-run]"
}

parse_common "$@"
require project zone name
((${#REST[@]} == 0)) || die "unknown argument: ${REST[0]}"

if ((QUEUED)); then
  run gcloud compute tpus queued-resources describe "$NAME" --project="$PROJECT" --zone="$ZONE" \
    --format="value(state.state)"
fi
while read -r node; do
  run gcloud compute tpus tpu-vm describe "$node" --project="$PROJECT" --zone="$ZONE" \
    --format="value(state,health)"
done < <(node_names)
ssh_all "pgrep -af 'bin/tpt' || echo 'no tpt process'"
