#!/usr/bin/env bash
# Installs tpt_jax on every worker of every slice: ships this checkout's commit (or clones a pushed
# commit with --repo) to ~/tpt_jax and builds ~/tpt_jax/.venv with uv's managed Python 3.11.
# shellcheck source=tpu_scripts/common.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'USAGE'
usage: setup.sh --project P --zone Z --name N [--commit REV] [--repo URL] [--gcsfuse BUCKET]
                [--slices K] [--dry-run]

  --commit REV    commit to install (default: this checkout's HEAD), resolved in this checkout
                  (with --repo, a REV this checkout lacks is resolved on the workers)
  --repo URL      clone URL on each worker instead of shipping the commit from this checkout
                  (the commit must be pushed there)
  --gcsfuse BUCKET  also install Cloud Storage FUSE and mount gs://BUCKET at /mnt/gcs/BUCKET
                  (as the workers' service account)
Shipping uses `git archive`: committed files only; uncommitted changes are left behind (a warning
says so). The workers need internet access (uv, Python 3.11 and the wheels are downloaded).
USAGE
}

parse_common "$@"
require project zone name
set -- "${REST[@]+"${REST[@]}"}"
REPO="" COMMIT="" BUCKET=""
while (($#)); do
  case "$1" in
    --repo) REPO="${2:?--repo needs a value}"; shift 2 ;;
    --commit) COMMIT="${2:?--commit needs a value}"; shift 2 ;;
    --gcsfuse) BUCKET="${2:?--gcsfuse needs a bucket name}"; shift 2 ;;
    *) die "unknown argument: $1" ;;
  esac
done
checkout="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
resolve_commit "$checkout" "$REPO"

# uv from PyPI (pip --user; --break-system-packages where the image's Python is marked externally
# managed), then a venv on uv's own CPython 3.11: the images' python3 is 3.10, tpt_jax needs 3.11.
# `uv pip install -e` keeps the venv valid when a later setup replaces the files beside it.
# shellcheck disable=SC2016  # $HOME and $PATH expand on the worker
steps=(
  'export PATH="$HOME/.local/bin:$PATH"'
  'cd ~/tpt_jax'
  'if ! command -v uv >/dev/null; then python3 -m pip --version >/dev/null 2>&1 || { sudo apt-get update -qq && sudo apt-get install -y -qq -o DPkg::Lock::Timeout=300 python3-pip; }; python3 -m pip install --user --quiet uv || python3 -m pip install --user --quiet --break-system-packages uv; fi'
  '.venv/bin/python -c "import sys; assert sys.version_info[:2] == (3, 11)" 2>/dev/null || { rm -rf .venv; uv venv --quiet --python 3.11 .venv; }'
  'uv pip install --quiet --python .venv/bin/python -e ".[tpu]"'
)
if [[ -n "$BUCKET" ]]; then
  [[ "$BUCKET" =~ ^[a-z0-9][a-z0-9._-]*$ ]] || die "--gcsfuse takes a bucket name (no gs://), got '$BUCKET'"
  # Google's apt repository for gcsfuse (cloud.google.com/storage/docs/cloud-storage-fuse/install).
  # shellcheck disable=SC2016  # expanded on the worker
  steps+=(
    'command -v gcsfuse >/dev/null || { echo "deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt gcsfuse-$(lsb_release -c -s) main" | sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null; curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null; sudo apt-get update -qq; sudo apt-get install -y -qq -o DPkg::Lock::Timeout=300 gcsfuse; }'
    "sudo mkdir -p /mnt/gcs/$BUCKET; sudo chown \"\$USER\" /mnt/gcs/$BUCKET; mountpoint -q /mnt/gcs/$BUCKET || gcsfuse --implicit-dirs $BUCKET /mnt/gcs/$BUCKET"
  )
fi
install="$(printf '%s; ' "${steps[@]}")"
install="${install%; }"

# A clone made in place (init, origin, fetch), not `git clone`: ~/tpt_jax may hold a checkout
# shipped earlier (files and .venv, no .git), and an existing clone's origin follows --repo.
# --force lets the commit's files replace shipped copies of them; the .venv stays.
if [[ -n "$REPO" ]]; then
  url="$(printf '%q' "$REPO")"
  ssh_all "set -e; mkdir -p ~/tpt_jax; cd ~/tpt_jax; [ -d .git ] || git init --quiet; \
if git remote get-url origin >/dev/null 2>&1; then git remote set-url origin $url; \
else git remote add origin $url; fi; git fetch --quiet origin; \
git checkout --quiet --force $(printf '%q' "$COMMIT"); $install"
  exit 0
fi

[[ "$COMMIT" != "$(git -C "$checkout" rev-parse HEAD)" ||
  -z "$(git -C "$checkout" status --porcelain --untracked-files=no)" ]] ||
  echo "setup.sh: warning: uncommitted changes are not shipped: only commit $COMMIT" >&2
tarball="${TMPDIR:-/tmp}/tpt_jax-$COMMIT.tar.gz"
run git -C "$checkout" archive --format=tar.gz --output="$tarball" "$COMMIT"
# A fresh tree each time (files deleted upstream must not linger), keeping the venv.
while read -r node; do
  run gcloud compute tpus tpu-vm scp "$tarball" "$node:tpt_jax.tar.gz" --project="$PROJECT" \
    --zone="$ZONE" --worker=all
done < <(node_names)
ssh_all "set -e; mkdir -p ~/tpt_jax; \
find ~/tpt_jax -mindepth 1 -maxdepth 1 ! -name .venv -exec rm -rf {} +; \
tar -xzf ~/tpt_jax.tar.gz -C ~/tpt_jax; rm ~/tpt_jax.tar.gz; $install"
((DRY_RUN)) || rm -f "$tarball"
