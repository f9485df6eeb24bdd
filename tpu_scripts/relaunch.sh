#!/usr/bin/env bash
# Keeps a preemptible (spot) queued-resource run going until it finishes: when the slice is
# preempted (queued resource SUSPENDED or FAILED, or gone), it is deleted, created again, set up,
# and the same command launched again; `tpt train` resumes from its latest checkpoint and
# `tpt think` from its committed chunks. It stops when the log shows the run finished.
# shellcheck source=tpu_scripts/common.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'USAGE'
usage: relaunch.sh --project P --zone Z --name N --accelerator-type T --repo URL
                   [--spot | --reservation] [--slices K] [--commit SHA] [--poll SECONDS]
                   [--max-restarts M] [--dry-run] -- tpt ARGS...

With --dry-run it prints the commands of one round: state query, create, setup and launch.
USAGE
}

here="$(dirname "${BASH_SOURCE[0]}")"
parse_common "$@"
args=("${COMMAND[@]+"${COMMAND[@]}"}")
require project zone name accelerator
((${#args[@]})) || die "nothing to launch: give the tpt sub-command after --"
REPO="" COMMIT="" POLL=300 MAX_RESTARTS=20
set -- "${REST[@]+"${REST[@]}"}"
while (($#)); do
  case "$1" in
    --repo) REPO="${2:?--repo needs a value}"; shift 2 ;;
    --commit) COMMIT="${2:?--commit needs a value}"; shift 2 ;;
    --poll) POLL="${2:?--poll needs seconds}"; shift 2 ;;
    --max-restarts) MAX_RESTARTS="${2:?--max-restarts needs a number}"; shift 2 ;;
    *) die "unknown argument: $1" ;;
  esac
done
[[ -n "$REPO" ]] || die "missing --repo (the git URL to install from)"

resource=(--project "$PROJECT" --zone "$ZONE" --name "$NAME" --slices "$SLICES")
create=("${resource[@]}" --accelerator-type "$ACCELERATOR" --runtime-version "$RUNTIME" --queued)
((SPOT)) && create+=(--spot)
((RESERVATION)) && create+=(--reservation)
setup=("${resource[@]}" --repo "$REPO")
[[ -n "$COMMIT" ]] && setup+=(--commit "$COMMIT")
dry=()
((DRY_RUN)) && dry=(--dry-run)
RUN="${args[0]}"
check_run_name "$RUN"

state() {
  gcloud compute tpus queued-resources describe "$NAME" --project="$PROJECT" --zone="$ZONE" \
    --format="value(state.state)" 2>/dev/null || echo NOT_FOUND
}

finished() {
  gcloud compute tpus tpu-vm ssh "$(node_names | head -n 1)" --project="$PROJECT" --zone="$ZONE" \
    --worker=0 --command="grep -q '^tpt: run complete' ~/tpt_logs/$(printf '%q' "$RUN.log")" \
    2>/dev/null
}

start_round() {
  bash "$here/create.sh" "${create[@]}" "${dry[@]+"${dry[@]}"}"
}

launch_round() {
  bash "$here/setup.sh" "${setup[@]}" "${dry[@]+"${dry[@]}"}"
  bash "$here/launch.sh" "${resource[@]}" "${dry[@]+"${dry[@]}"}" -- "${args[@]}"
}

if ((DRY_RUN)); then
  run gcloud compute tpus queued-resources describe "$NAME" --project="$PROJECT" --zone="$ZONE" \
    --format="value(state.state)"
  start_round
  launch_round
  exit 0
fi

restarts=0 launched=0
while true; do
  current="$(state)"
  case "$current" in
    ACTIVE)
      if ((!launched)); then
        launch_round
        launched=1
      elif finished; then
        echo "relaunch: $RUN finished"
        exit 0
      fi
      ;;
    SUSPENDED | FAILED | NOT_FOUND)
      ((restarts <= MAX_RESTARTS)) || die "gave up after $MAX_RESTARTS restarts"
      echo "relaunch: queued resource $NAME is $current; recreating (restart $restarts)"
      [[ "$current" == NOT_FOUND ]] || bash "$here/teardown.sh" "${resource[@]}" --queued
      start_round
      restarts=$((restarts + 1)) launched=0
      ;;
    *) echo "relaunch: queued resource $NAME is $current; waiting" ;;
  esac
  sleep "$POLL"
done
