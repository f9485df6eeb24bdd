#!/usr/bin/env bash
# Keeps a queued-resource run going until it finishes. Every --poll seconds it asks the queued
# resource's state and, while it is ACTIVE, each worker's run state (launch.sh records tpt's exit
# status in ~/tpt_logs/RUN.exit):
#   every worker done (exit 0; train and think also print "tpt: run complete")   -> stop, status 0
#   a worker exited 2 (tpt's user errors: config, checkpoint of other settings)
#                                  -> stop at once with the reason and its last log lines, status 1
#   a worker exited 127 (tpt not installed)  -> set up again and launch; not a restart
#   a worker failed (non-zero), or the run stopped early or vanished on a healthy slice
#                                  -> launch again (resume), at most --max-restarts times in a row
#                                     (a run seen running at two polls in a row resets the count),
#                                     then stop with the reason and that worker's last log lines
#   queued resource SUSPENDED, FAILED or gone (preempted)
#                                  -> delete, create, set up and launch again (--max-recreates)
# A failed setup is retried at the next round (at most 3 in a row), never followed by a launch.
# A TPU VM created without a queued resource is refused at the start (it cannot be recreated here).
# `tpt train` resumes from its latest checkpoint and `tpt think` from its committed chunks.
# shellcheck source=tpu_scripts/common.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'USAGE'
usage: relaunch.sh --project P --zone Z --name N --accelerator-type T [--spot | --reservation]
                   [--slices K] [--workers N] [--commit REV] [--repo URL] [--gcsfuse BUCKET] [--run RUN]
                   [--poll SECONDS] [--max-restarts M] [--max-recreates R] [--dry-run] -- tpt ARGS...

  --commit REV, --repo URL, --gcsfuse BUCKET
                             passed to setup.sh; it installs (default: this checkout's HEAD). REV is
                             resolved to a commit hash once, at the start, so that every recreated
                             slice gets the same code
  --run RUN                  run name, as for launch.sh (default: the sub-command)
  --poll SECONDS             time between checks (default 300)
  --max-restarts M           relaunches in a row of a run that failed on a healthy slice (default 3)
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
resolve_commit "$here/.." "$REPO"

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

# The state of a queued resource (`state_of queued-resources NAME state.state`) or a TPU VM
# (`state_of tpu-vm NODE state`). NOT_FOUND only when gcloud's error says so (an unreachable API is
# UNKNOWN: waiting beats deleting a healthy slice). stderr is read apart, and only for that:
# gcloud also warns there ("WARNING: Some update is available"), which is no state.
state_of() {
  local out
  if out="$(gcloud compute tpus "$1" describe "$2" --project="$PROJECT" --zone="$ZONE" \
    --format="value($3)" 2>"$gcloud_errors")"; then
    echo "${out:-UNKNOWN}"
  elif grep -q -e NOT_FOUND -e "not found" "$gcloud_errors"; then
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
  bash "$here/setup.sh" "${setup[@]}" "${dry[@]+"${dry[@]}"}"
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

gcloud_errors="$(mktemp)"
trap 'rm -f "$gcloud_errors"' EXIT

# Stops with status 1: the reason, and the last lines of the worker's log. Arguments: the reason,
# the node and the worker number.
give_up() {
  local reason="$1" node="$2" worker="$3"
  [[ "$worker" =~ ^[0-9]+$ ]] || worker=0
  echo "relaunch.sh: error: $RUN $reason" >&2
  echo "relaunch.sh: last lines of $log on $node worker $worker:" >&2
  gcloud compute tpus tpu-vm ssh "$node" --project="$PROJECT" --zone="$ZONE" \
    --worker="$worker" --command="tail -n 30 $log" >&2 2>/dev/null || true
  exit 1
}

# A run that ended badly on a healthy slice: launch it again, or give up. Arguments as give_up's.
relaunch_or_stop() {
  ((restarts < MAX_RESTARTS)) || give_up "$1; stopping after $MAX_RESTARTS restarts in a row" "$2" "$3"
  restarts=$((restarts + 1))
  echo "relaunch: $RUN $1; launching again (restart $restarts of $MAX_RESTARTS)"
  launch_round
}

# Sets up every worker and launches, or leaves both to the next round if setup.sh fails (so no run
# starts on a half-installed slice). SETUP_TRIES setups in a row that never got the run going stop
# the watch. Argument: why.
SETUP_TRIES=3
setup_and_launch() {
  ((setups < SETUP_TRIES)) || {
    echo "relaunch.sh: error: $RUN did not start after $SETUP_TRIES setups in a row (see setup.sh's errors above)" >&2
    exit 1
  }
  setups=$((setups + 1))
  echo "relaunch: $1; setting up and launching $RUN"
  if setup_round; then
    launch_round
    launched=1
  else
    echo "relaunch: setup.sh failed; setting up again at the next round" >&2
  fi
}

# seen: the queued resource existed once; was_running: the last poll saw the run running.
total=$((WORKERS * SLICES)) restarts=0 recreates=0 launched=0 setups=0 seen=0 was_running=0
while true; do
  current="$(state_of queued-resources "$NAME" state.state)" is_running=0
  [[ "$current" == NOT_FOUND || "$current" == UNKNOWN ]] || seen=1
  case "$current" in
    ACTIVE)
      answered=0 finished=0 running=0 stopped=0 absent=0 failure="" failure_rank=0
      stop_at="$(node_names | head -n 1) 0" absent_at="$(node_names | head -n 1) 0"
      while read -r node state status worker; do
        answered=$((answered + 1))
        case "$state" in
          done) finished=$((finished + 1)) ;;
          running) running=$((running + 1)) ;;
          stopped) stopped=$((stopped + 1)) stop_at="$node $worker" ;;
          none) absent=$((absent + 1)) absent_at="$node $worker" ;;
          failed)  # the failure that decides: a user error (2), then tpt missing (127), then any
            rank=1
            [[ "$status" != 127 ]] || rank=2
            [[ "$status" != 2 ]] || rank=3
            ((rank <= failure_rank)) || failure="$status $node $worker" failure_rank=$rank ;;
        esac
      done < <(run_states)
      if [[ -n "$failure" ]]; then  # the other workers may hang in a collective: relaunch all
        read -r status node worker <<<"$failure"
        case "$status" in
          2) give_up "exited with status 2 on $node worker $worker: a user error (config or checkpoint settings); not relaunching" "$node" "$worker" ;;
          127) setup_and_launch "tpt is not installed on $node worker $worker (exit 127)" ;;
          *) relaunch_or_stop "exited with status $status on $node worker $worker" "$node" "$worker" ;;
        esac
      elif ((finished == total)); then
        echo "relaunch: $RUN finished on all $total workers"
        exit 0
      elif ((answered < total)); then
        echo "relaunch: $answered of $total workers answered; waiting"
      elif ((running > 0)); then  # still going; the install worked
        is_running=1 setups=0
        if ((was_running && restarts > 0)); then  # a full poll interval of progress
          echo "relaunch: $RUN has run for a poll interval; the restart count starts again"
          restarts=0
        fi
      elif ((!launched && absent > 0)); then
        setup_and_launch "queued resource $NAME is ACTIVE"
      elif ((stopped > 0)); then
        # shellcheck disable=SC2086  # "node worker"
        relaunch_or_stop "stopped early (exit 0 without 'tpt: run complete')" $stop_at
      else
        # shellcheck disable=SC2086  # "node worker"
        relaunch_or_stop "is gone without an exit status" $absent_at
      fi
      ;;
    SUSPENDED | FAILED | NOT_FOUND)
      if [[ "$current" == NOT_FOUND ]]; then
        # A TPU VM of that name without a queued resource: one created by create.sh without
        # --spot/--queued/--slices (queued-resources create would clash with it), or the VM of a
        # queued resource deleted a moment ago.
        node="$(node_names | head -n 1)"
        vm="$(state_of tpu-vm "$node" state)"
        if [[ "$vm" != NOT_FOUND ]]; then
          ((seen)) || [[ "$vm" == UNKNOWN ]] || die "$node is a TPU VM without a queued resource" \
            "(create.sh without --spot, --queued or --slices); relaunch.sh watches queued resources:" \
            "delete it (teardown.sh) and create it with create.sh --queued, or watch it with status.sh"
          if [[ "$vm" == UNKNOWN ]]; then
            echo "relaunch: queued resource $NAME is gone; cannot tell whether TPU VM $node is; waiting"
          else
            echo "relaunch: queued resource $NAME is gone but its TPU VM is still there ($vm); waiting"
          fi
          was_running=0
          sleep "$POLL"
          continue
        fi
      fi
      ((recreates < MAX_RECREATES)) || die "queued resource $NAME is $current; stopping after $MAX_RECREATES recreations"
      recreates=$((recreates + 1)) launched=0 restarts=0 setups=0 seen=1
      echo "relaunch: queued resource $NAME is $current; recreating (recreation $recreates of $MAX_RECREATES)"
      [[ "$current" == NOT_FOUND ]] || bash "$here/teardown.sh" "${resource[@]}" --queued ||
        echo "relaunch: teardown.sh failed; creating anyway" >&2
      create_round
      ;;
    *) echo "relaunch: queued resource $NAME is $current; waiting" ;;
  esac
  was_running=$is_running
  sleep "$POLL"
done
