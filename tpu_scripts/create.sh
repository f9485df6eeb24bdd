#!/usr/bin/env bash
# Creates a TPU VM slice, or a queued resource (spot, reservation, or several slices).
# shellcheck source=tpu_scripts/common.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'USAGE'
usage: create.sh --project P --zone Z --name N --accelerator-type T [options]

  --runtime-version V   TPU software version (default v2-alpha-tpuv5)
  --queued              create through a queued resource (waits for capacity)
  --spot                spot capacity (queued resource)
  --reservation         use the project's reservation
  --slices K            K slices over DCN (a multi-slice queued resource)
  --dry-run             print the gcloud commands instead of running them
USAGE
}

parse_common "$@"
require project zone name accelerator
((${#REST[@]} == 0)) || die "unknown argument: ${REST[0]}"

capacity=()
((SPOT)) && capacity+=(--spot)
((RESERVATION)) && capacity+=(--reserved)
((SPOT)) && QUEUED=1

if ((QUEUED)); then
  nodes=(--node-id="$NAME")
  ((SLICES > 1)) && nodes=(--node-count="$SLICES" --node-prefix="$NAME")
  run gcloud compute tpus queued-resources create "$NAME" --project="$PROJECT" --zone="$ZONE" \
    --accelerator-type="$ACCELERATOR" --runtime-version="$RUNTIME" "${nodes[@]}" "${capacity[@]}"
else
  run gcloud compute tpus tpu-vm create "$NAME" --project="$PROJECT" --zone="$ZONE" \
    --accelerator-type="$ACCELERATOR" --version="$RUNTIME" "${capacity[@]}"
fi
