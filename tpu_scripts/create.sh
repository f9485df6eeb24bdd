#!/usr/bin/env bash
# Creates a TPU VM slice, or a queued resource (spot, reservation, or several slices).
# shellcheck source=tpu_scripts/common.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'USAGE'
usage: create.sh --project P --zone Z --name N --accelerator-type T [options]

  --version V            TPU software version (default: Google's JAX image for the accelerator:
                         v4 tpu-ubuntu2204-base, v5e v2-alpha-tpuv5-lite, v5p v2-alpha-tpuv5,
                         v6e v2-alpha-tpuv6e); --runtime-version is the same option
  --queued               create through a queued resource (waits for capacity)
  --spot                 spot capacity (queued resource)
  --reservation          use the project's reservation
  --slices K             K slices over DCN (a multi-slice queued resource)
  --network NET          VPC network (gcloud's default: "default")
  --subnetwork SUBNET    subnetwork of that network
  --service-account SA   service account the workers run as (e.g. for a GCS bucket)
  --scopes S1,S2         OAuth scopes of that service account
  --tags T1,T2           network tags (firewall rules)
  --metadata K=V,...     VM metadata
  --labels K=V,...       resource labels
  --internal-ips         no external IPs (the subnet needs Cloud NAT for setup.sh's downloads)
  --dry-run              print the gcloud commands instead of running them
USAGE
}

parse_common "$@"
require project zone name accelerator

# The same flag names on `tpu-vm create` and `queued-resources create` (gcloud reference).
passthrough=()
set -- "${REST[@]+"${REST[@]}"}"
while (($#)); do
  case "$1" in
    --network | --subnetwork | --service-account | --scopes | --tags | --metadata | --labels)
      [[ $# -ge 2 && -n "$2" ]] || die "$1 needs a value"
      passthrough+=("$1=$2"); shift 2 ;;
    --internal-ips) passthrough+=(--internal-ips); shift ;;
    *) die "unknown argument: $1" ;;
  esac
done

if [[ -z "$RUNTIME" ]]; then
  RUNTIME="$(runtime_for_accelerator "$ACCELERATOR")" ||
    die "no default TPU software version for --accelerator-type '$ACCELERATOR': give --version"
fi

capacity=()
((SPOT)) && capacity+=(--spot)
((RESERVATION)) && capacity+=(--reserved)
((SPOT)) && QUEUED=1

if ((QUEUED)); then
  nodes=(--node-id="$NAME")
  ((SLICES > 1)) && nodes=(--node-count="$SLICES" --node-prefix="$NAME")
  run gcloud compute tpus queued-resources create "$NAME" --project="$PROJECT" --zone="$ZONE" \
    --accelerator-type="$ACCELERATOR" --runtime-version="$RUNTIME" "${nodes[@]}" \
    "${capacity[@]+"${capacity[@]}"}" "${passthrough[@]+"${passthrough[@]}"}"
else
  run gcloud compute tpus tpu-vm create "$NAME" --project="$PROJECT" --zone="$ZONE" \
    --accelerator-type="$ACCELERATOR" --version="$RUNTIME" \
    "${capacity[@]+"${capacity[@]}"}" "${passthrough[@]+"${passthrough[@]}"}"
fi
