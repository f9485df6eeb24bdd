#!/usr/bin/env bash
# Runs a tpt command on every worker of every slice, in the background, logging to
# ~/tpt_logs/RUN.log on each worker, its sub-command to RUN.cmd and tpt's exit status to RUN.exit
# when it ends (relaunch.sh and status.sh read them). A run of the same name still going on a worker is
# stopped first (SIGTERM: training saves a checkpoint). JAX finds its peers on a TPU slice by
# itself; for several slices the MEGASCALE_* variables below tell each slice who it is.
# shellcheck source=tpu_scripts/common.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'USAGE'
usage: launch.sh --project P --zone Z --name N [--slices K] [--run RUN] [--env K=V ...] -- tpt ARGS...

  --run RUN     log name (default: the sub-command)
  --env K=V     environment variable for the command (repeatable)
  example: launch.sh --project p --zone z --name n -- train configs/experiments/pretrain_8b_tpt.yaml
USAGE
}

parse_common "$@"
args=("${COMMAND[@]+"${COMMAND[@]}"}")
require project zone name
((${#args[@]})) || die "nothing to launch: give the tpt sub-command after --"

RUN="${args[0]}" envs=()
set -- "${REST[@]+"${REST[@]}"}"
while (($#)); do
  case "$1" in
    --run) RUN="${2:?--run needs a value}"; shift 2 ;;
    --env) envs+=("${2:?--env needs K=V}"); shift 2 ;;
    *) die "unknown argument: $1" ;;
  esac
done

check_run_name "$RUN"
# Everything below reaches the workers' shell through --command: quote every value (%q) so that
# a name or argument arrives as written and is never run as code.
quoted_args="" quoted_envs=""
for word in "${args[@]}"; do quoted_args+=" $(printf '%q' "$word")"; done
for word in "${envs[@]+"${envs[@]}"}"; do quoted_envs+=" $(printf '%q' "$word")"; done

coordinator=""
if ((SLICES > 1)); then  # slices meet over DCN at worker 0 of slice 0
  describe=(gcloud compute tpus tpu-vm describe "$NAME-0" --project="$PROJECT" --zone="$ZONE"
    --format="value(networkEndpoints[0].ipAddress)")
  if ((DRY_RUN)); then
    run "${describe[@]}"
    coordinator='<ip of worker 0 of '"$NAME"'-0>'
  else
    coordinator="$("${describe[@]}")"
  fi
fi

# The previous run of this name: its wrapper is killed first (so that it records no exit status
# after this launch clears it), then tpt gets SIGTERM and up to 300 s to save and exit. A wrapper
# that wrote RUN.exit has ended, and its pid may belong to another process by now: left alone.
# shellcheck disable=SC2016  # expanded on the worker
stop_previous='if [ -f "$f.pid" ] && read -r p c < "$f.pid"; then [ -f "$f.exit" ] || kill "$p" 2>/dev/null; if grep -qa tpt "/proc/$c/cmdline" 2>/dev/null; then kill "$c"; i=0; while grep -qa tpt "/proc/$c/cmdline" 2>/dev/null && [ $i -lt 300 ]; do sleep 1; i=$((i + 1)); done; kill -9 "$c" 2>/dev/null; fi; fi; rm -f "$f.exit" "$f.pid"'
slice=0
while read -r node; do
  megascale=""
  if ((SLICES > 1)); then
    megascale=" MEGASCALE_COORDINATOR_ADDRESS=$(printf '%q' "$coordinator:8080")"
    megascale+=" MEGASCALE_NUM_SLICES=$SLICES"
    megascale+=" MEGASCALE_SLICE_ID=$slice MEGASCALE_PORT=8080"
  fi
  # RUN.cmd records the sub-command, by which status.sh tells a finished run from a stopped one.
  # A subshell that ignores SIGHUP (so tpt, which inherits that, outlives the ssh session) waits
  # for tpt and writes its exit status.
  run gcloud compute tpus tpu-vm ssh "$node" --project="$PROJECT" --zone="$ZONE" --worker=all \
    --command="mkdir -p ~/tpt_logs; cd ~/tpt_jax; $(run_files "$RUN"); $stop_previous; \
printf '%s\\n' $(printf '%q' "${args[0]}") > \"\$f.cmd\"; ( trap '' HUP; env$megascale$quoted_envs .venv/bin/tpt$quoted_args > \"\$f.log\" 2>&1 & \
echo \"\$BASHPID \$!\" > \"\$f.pid\"; wait \$!; echo \$? > \"\$f.exit\" ) > /dev/null 2>&1 &"
  slice=$((slice + 1))
done < <(node_names)
