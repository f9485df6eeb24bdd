#!/usr/bin/env bash
# Keeps a queued-resource run going until it finishes. Every --poll seconds it asks the queued
# resource's state and, while it is ACTIVE, each worker's run state (launch.sh records tpt's exit
# status in ~/tpt_logs/RUN.exit):
#   every worker done (exit 0; train and think also print "tpt: run complete")   -> stop, status 0
#   a worker failed (non-zero), or the run stopped early or vanished on a healthy slice
#                                  -> launch again (resume), at most --max-restarts times, then stop
#                                     with the reason and that worker's last log lines, status 1
#   queued resource SUSPENDED, FAILED or gone (preempted)
#                                  -> delete, create, set up and launch again (--max-recreates)
# `tpt train` resumes from its latest checkpoint and `tpt think` from its committed chunks.
# shellcheck source=tpu_scripts/common.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'USAGE'
usage: relaunch.sh --project P --zone Z --name N --accelerator-type T [--spot | --reservation]
                   [--slices K] [--workers N] [--commit REV] [--repo URL] [--gcsfuse BUCKET] [--run RUN]
                   [--poll SECONDS] [--max-restarts M] [--max-recreates R] [--dry-run] -- tpt ARGS...

  --commit REV, --repo URL, --gcsfuse BUCKET
                             passed to setup.sh; it installs (default: this checkout's HEAD, read once at
                             the start, so that every recreated slice gets the same code)
  --run RUN                  run name, as for launch.sh (default: the sub-command)
  --poll SECONDS             time between checks (default 300)
  --max-restarts M           relaunches of a run that failed on a healthy slice (default 3)
  --max-recreates R          recreations of a preempted queued resource (default 20)
  --network, --subnetwork, --service-account, --scopes, --tags, --metadata, --labels,
  --internal-ips             passed to create.sh, for every recreation
With --dry-run it prints the commands of one round: state queries, create, setup and launch.
USAGE
}

here="$(dirname "${BASH_SOURCE[0]}")"
parse_common "$@"
args=("${COMMAND[@]+"${COMMAND[@]}"}")
require project zone name accelerator
((${#args[@]})) || die "nothing to launch: give the tpt sub-command after --"
REPO="" COMMIT="" BUCKET="" RUN="${args[0]}" POLL=300 MAX_RESTARTS=3 MAX_RECREATES=20
passthrough=()  # create.sh's network and identity flags, for every recreation
set -- "${REST[@]+"${REST[@]}"}"
while (($#)); do
  case "$1" in
    --repo) REPO="${2:?--repo needs a value}"; shift 2 ;;
    --commit) COMMIT="${2:?--commit needs a value}"; shift 2 ;;
    --gcsfuse) BUCKET="${2:?--gcsfuse needs a bucket name}"; shift 2 ;;
    --run) RUN="${2:?--run needs a value}"; shift 2 ;;
    --poll) POLL="${2:?--poll needs seconds}"; shift 2 ;;
    --max-restarts) MAX_RESTARTS="${2:?--max-restarts needs a number}"; shift 2 ;;
    --max-recreates) MAX_RECREATES="${2:?--max-recreates needs a number}"; shift 2 ;;
    --network | --subnetwork | --service-account | --scopes | --tags | --metadata | --labels)
      passthrough+=("$1" "${2:?$1 needs a value}"); shift 2 ;;
    --internal-ips) passthrough+=(--internal-ips); shift ;;
    *) die "unknown argument: $1" ;;
  esac
done
for value in "$POLL" "$MAX_RESTARTS" "$MAX_RECREATES"; do
  [[ "$value" =~ ^[0-9]+$ ]] || die "--poll, --max-restarts and --max-recreates take whole numbers, got '$value'"
done
check_run_name "$RUN"
resolve_workers
if [[ -z "$COMMIT" ]]; then
  COMMIT="$(git -C "$here" rev-parse HEAD)" || die "not a git checkout: give --commit"
fi

resource=(--project "$PROJECT" --zone "$ZONE" --name "$NAME" --slices "$SLICES")
create=("${resource[@]}" --accelerator-type "$ACCELERATOR" --queued)
[[ -n "$RUNTIME" ]] && create+=(--version "$RUNTIME")
((SPOT)) && create+=(--spot)
((RESERVATION)) && create+=(--reservation)
create+=("${passthrough[@]+"${passthrough[@]}"}")
setup=("${resource[@]}" --commit "$COMMIT")
[[ -n "$REPO" ]] && setup+=(--repo "$REPO")
[[ -n "$BUCKET" ]] && setup+=(--gcsfuse "$BUCKET")
dry=()
((DRY_RUN)) && dry=(--dry-run)
probe="$(run_state_probe "$RUN" "${args[0]}")"
# shellcheck disable=SC2088  # expanded on the worker
log="~/tpt_logs/$(printf '%q' "$RUN.log")"

# The queued resource's state; NOT_FOUND only when gcloud says so (an unreachable API is UNKNOWN:
# waiting beats deleting a healthy slice).
qr_state() {
  local out
  if out="$(gcloud compute tpus queued-resources describe "$NAME" --project="$PROJECT" \
    --zone="$ZONE" --format="value(state.state)" 2>&1)"; then
    echo "$out"
  elif [[ "$out" == *NOT_FOUND* || "$out" == *"not found"* ]]; then
    echo NOT_FOUND
  else
    echo UNKNOWN
  fi
}

# One line per worker that answered: NODE STATE STATUS WORKER (see run_state_probe).
run_states() {
  local node
  while read -r node; do
    { gcloud compute tpus tpu-vm ssh "$node" --project="$PROJECT" --zone="$ZONE" --worker=all \
      --command="$probe" 2>/dev/null || true; } | sed -n "s/^.*tpt-state: /$node /p"
  done < <(node_names)
}

# A failed step is reported and left to the next round to notice (state or run state), so that a
# passing gcloud or ssh failure never ends the watch.
create_round() {
  bash "$here/create.sh" "${create[@]}" "${dry[@]+"${dry[@]}"}" ||
    echo "relaunch: create.sh failed; retrying at the next round" >&2
}
setup_round() {
  bash "$here/setup.sh" "${setup[@]}" "${dry[@]+"${dry[@]}"}" ||
    echo "relaunch: setup.sh failed; the launch after it will fail too" >&2
}
launch_round() {
  bash "$here/launch.sh" "${resource[@]}" --run "$RUN" "${dry[@]+"${dry[@]}"}" -- "${args[@]}" ||
    echo "relaunch: launch.sh failed; the next round sees no run" >&2
}

if ((DRY_RUN)); then
  run gcloud compute tpus queued-resources describe "$NAME" --project="$PROJECT" --zone="$ZONE" \
    --format="value(state.state)"
  while read -r node; do
    run gcloud compute tpus tpu-vm ssh "$node" --project="$PROJECT" --zone="$ZONE" --worker=all \
      --command="$probe"
  done < <(node_names)
  create_round
  setup_round
  launch_round
  exit 0
fi

# A run that ended badly on a healthy slice: launch it again, or give up with the reason and the
# last lines of the worker's log. Arguments: the reason, the node and the worker number.
relaunch_or_stop() {
  local reason="$1" node="$2" worker="$3"
  [[ "$worker" =~ ^[0-9]+$ ]] || worker=0
  if ((restarts >= MAX_RESTARTS)); then
    echo "relaunch.sh: error: $RUN $reason; stopping after $MAX_RESTARTS restarts" >&2
    echo "relaunch.sh: last lines of $log on $node worker $worker:" >&2
    gcloud compute tpus tpu-vm ssh "$node" --project="$PROJECT" --zone="$ZONE" \
      --worker="$worker" --command="tail -n 30 $log" >&2 2>/dev/null || true
    exit 1
  fi
  restarts=$((restarts + 1))
  echo "relaunch: $RUN $reason; launching again (restart $restarts of $MAX_RESTARTS)"
  launch_round
}

total=$((WORKERS * SLICES)) restarts=0 recreates=0 launched=0
while true; do
  current="$(qr_state)"
  case "$current" in
    ACTIVE)
      answered=0 finished=0 running=0 stopped=0 absent=0 failure=""
      stop_at="$(node_names | head -n 1) 0" absent_at="$(node_names | head -n 1) 0"
      while read -r node state status worker; do
        answered=$((answered + 1))
        case "$state" in
          done) finished=$((finished + 1)) ;;
          running) running=$((running + 1)) ;;
          stopped) stopped=$((stopped + 1)) stop_at="$node $worker" ;;
          none) absent=$((absent + 1)) absent_at="$node $worker" ;;
          failed) [[ -n "$failure" ]] || failure="$status $node $worker" ;;
        esac
      done < <(run_states)
      if [[ -n "$failure" ]]; then  # the other workers may hang in a collective: relaunch all
        read -r status node worker <<<"$failure"
        relaunch_or_stop "exited with status $status on $node worker $worker" "$node" "$worker"
      elif ((finished == total)); then
        echo "relaunch: $RUN finished on all $total workers"
        exit 0
      elif ((answered < total)); then
        echo "relaunch: $answered of $total workers answered; waiting"
      elif ((running > 0)); then
        :  # still going
      elif ((!launched && absent > 0)); then
        echo "relaunch: queued resource $NAME is ACTIVE; setting up and launching $RUN"
        setup_round
        launch_round
        launched=1
      elif ((stopped > 0)); then
        # shellcheck disable=SC2086  # "node worker"
        relaunch_or_stop "stopped early (exit 0 without 'tpt: run complete')" $stop_at
      else
        # shellcheck disable=SC2086  # "node worker"
        relaunch_or_stop "is gone without an exit status" $absent_at
      fi
      ;;
    SUSPENDED | FAILED | NOT_FOUND)
      ((recreates < MAX_RECREATES)) || die "queued resource $NAME is $current; stopping after $MAX_RECREATES recreations"
      recreates=$((recreates + 1)) launched=0
      echo "relaunch: queued resource $NAME is $current; recreating (recreation $recreates of $MAX_RECREATES)"
      [[ "$current" == NOT_FOUND ]] || bash "$here/teardown.sh" "${resource[@]}" --queued ||
        echo "relaunch: teardown.sh failed; creating anyway" >&2
      create_round
      ;;
    *) echo "relaunch: queued resource $NAME is $current; waiting" ;;
  esac
  sleep "$POLL"
done
