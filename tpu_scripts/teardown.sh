#!/usr/bin/env bash
# Deletes the queued resource (and its slices) or the TPU VM.
# shellcheck source=tpu_scripts/common.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  echo "usage: teardown.sh --project P --zone Z --name N [--queued] [--slices K] [--dry-run]"
}

parse_common "$@"
require project zone name
((${#REST[@]} == 0)) || die "unknown argument: ${REST[0]}"

if ((QUEUED)); then
  run gcloud compute tpus queued-resources delete "$NAME" --project="$PROJECT" --zone="$ZONE" \
    --force --quiet
else
  run gcloud compute tpus tpu-vm delete "$NAME" --project="$PROJECT" --zone="$ZONE" --quiet
fi
