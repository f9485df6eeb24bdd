#!/usr/bin/env bash
# Installs tpt_jax at a given commit on every worker of every slice.
# shellcheck source=tpu_scripts/common.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'USAGE'
usage: setup.sh --project P --zone Z --name N --repo URL [--commit SHA] [--slices K] [--dry-run]

  --repo URL      git URL of the tpt_jax repository
  --commit SHA    commit to install (default: this checkout's HEAD)
USAGE
}

parse_common "$@"
require project zone name
set -- "${REST[@]+"${REST[@]}"}"
REPO="" COMMIT=""
while (($#)); do
  case "$1" in
    --repo) REPO="${2:?--repo needs a value}"; shift 2 ;;
    --commit) COMMIT="${2:?--commit needs a value}"; shift 2 ;;
    *) die "unknown argument: $1" ;;
  esac
done
[[ -n "$REPO" ]] || die "missing --repo (the git URL to install from)"
if [[ -z "$COMMIT" ]]; then
  COMMIT="$(git -C "$(dirname "${BASH_SOURCE[0]}")" rev-parse HEAD)"
fi

ssh_all "set -e; [ -d ~/tpt_jax ] || git clone $(printf '%q' "$REPO") ~/tpt_jax; cd ~/tpt_jax; \
git fetch --quiet origin; git checkout --quiet $(printf '%q' "$COMMIT"); \
python3 -m venv .venv; .venv/bin/pip install --quiet -U pip; \
.venv/bin/pip install --quiet -e . 'jax[tpu]==0.10.2' \
-f https://storage.googleapis.com/jax-releases/libtpu_releases.html"
