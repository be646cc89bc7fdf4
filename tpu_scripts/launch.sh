#!/usr/bin/env bash
# Run one `python -m easyrl COMMAND ARGS...` on every worker of the pod, logs teed per worker.
set -euo pipefail
# shellcheck source=common.sh
. "$(dirname "$0")/common.sh"

usage() {
  cat << EOF2
Usage: $PROG [options] COMMAND [ARGS...]
       $PROG [--dry-run] [--env FILE] --fetch-logs RUN_NAME

Run \`\$PYTHON -m easyrl COMMAND ARGS...\` on all workers at once (gcloud ... ssh --worker=all),
from \$REMOTE_DIR, with LIBTPU_INIT_ARGS (env.sh) exported. Each worker tees its output to
\$REMOTE_DIR/logs/RUN_NAME/<its hostname>.log; afterwards (even when the run fails) the logs are
copied back (\`gcloud ... scp --worker=N\`, one per worker) into $LOCAL_LOG_DIR/$TPU_NAME/RUN_NAME/.
Everything from COMMAND on is passed to easyrl untouched.

Example:
  $PROG ppo --config configs/ppo.py:tulu25_13b \\
      --config.output_dir=gs://BUCKET/runs/ppo --config.mesh=dp:1,fsdp:-1,tp:8

Options:
  --run-name NAME   log folder name (default: COMMAND-YYYYmmdd-HHMMSS)
  --export K=V      also export K=V on the workers (repeatable), e.g. --export HF_TOKEN=...
  --detach          start under nohup and return at once (the run survives a dropped ssh);
                    collect the logs later with --fetch-logs NAME, stop it with stop.sh
  --no-fetch        do not copy the logs back after the run
  --fetch-logs NAME only copy back the logs of run NAME
  --                end of options (needed only when COMMAND itself starts with -)

EOF2
  settings_help
}

RUN_NAME=''
EXPORTS=''
DETACH=0
FETCH=1
FETCH_ONLY=''
add_export() {
  case "$1" in
    [A-Za-z_]*=*) ;;
    *) usage_error "--export wants NAME=VALUE, got: $1" ;;
  esac
  case "${1%%=*}" in
    *[!A-Za-z0-9_]*) usage_error "--export: not a variable name: ${1%%=*}" ;;
  esac
  EXPORTS="$EXPORTS export ${1%%=*}=$(shquote "${1#*=}") &&"
}
script_option() {
  case "$1" in
    --run-name | --run-name=*)
      option_value "$@"
      RUN_NAME=$OPTION_VALUE
      ;;
    --export | --export=*)
      option_value "$@"
      add_export "$OPTION_VALUE"
      ;;
    --fetch-logs | --fetch-logs=*)
      option_value "$@"
      FETCH_ONLY=$OPTION_VALUE
      ;;
    --detach) DETACH=1 ;;
    --no-fetch) FETCH=0 ;;
    *) return 1 ;;
  esac
}
UNKNOWN_HINT=' (launch options go before COMMAND)'
parse_options command "$@"
shift "$OPTIONS_USED"
finish_options

# gcloud scp copies to this machine from one worker at a time: one scp per worker, FETCH_PARALLEL
# at once. Files are named by worker hostname, so they all land side by side.
fetch_logs() {
  local name=$1 n w pids='' pid failed=0 batch=${FETCH_PARALLEL:-8}
  case "$batch" in '' | *[!0-9]* | 0) batch=8 ;; esac
  n=$(worker_count) || return 1
  run mkdir -p "$LOCAL_LOG_DIR/$TPU_NAME"
  w=0
  while [ "$w" -lt "$n" ]; do
    if is_dry_run; then
      gcloud_tpu scp --recurse "$TPU_NAME:$REMOTE_DIR/logs/$name" "$LOCAL_LOG_DIR/$TPU_NAME/" --zone="$ZONE" --worker="$w"
    else
      gcloud_tpu scp --recurse "$TPU_NAME:$REMOTE_DIR/logs/$name" "$LOCAL_LOG_DIR/$TPU_NAME/" --zone="$ZONE" --worker="$w" &
      pids="$pids $!"
    fi
    w=$((w + 1))
    if [ $((w % batch)) -eq 0 ] || [ "$w" -eq "$n" ]; then
      for pid in $pids; do
        wait "$pid" || failed=$((failed + 1))
      done
      pids=''
    fi
  done
  if [ "$failed" -gt 0 ]; then
    note "$failed of $n workers' logs could not be copied (retry: $0 --fetch-logs $name)"
    return 1
  fi
  is_dry_run || note "logs of $n workers in $LOCAL_LOG_DIR/$TPU_NAME/$name/"
}

if [ -n "$FETCH_ONLY" ]; then
  [ $# -eq 0 ] || usage_error "--fetch-logs takes no COMMAND"
  fetch_logs "$FETCH_ONLY"
  exit 0
fi

[ $# -gt 0 ] || usage_error "missing COMMAND (sft, rm, dpo, rrhf, ppo, generate, ...)"
case "$1" in
  *[!A-Za-z0-9_-]*) usage_error "not an easyrl command: $1" ;;
esac
[ -n "$RUN_NAME" ] || RUN_NAME="$1-$(date +%Y%m%d-%H%M%S)"
case "$RUN_NAME" in
  '' | . | .. | *[!A-Za-z0-9_.-]*) usage_error "--run-name may hold only letters, digits and _ . -" ;;
esac

LOG_DIR="logs/$RUN_NAME"
LOG_FILE="$LOG_DIR/\$(hostname).log"
EASYRL="$PYTHON -m easyrl $(shjoin "$@")"
PREFIX="cd $(shquote "$REMOTE_DIR") && mkdir -p $LOG_DIR && export LIBTPU_INIT_ARGS=$(shquote "$LIBTPU_INIT_ARGS") && export PYTHONUNBUFFERED=1 &&$EXPORTS"
if [ "$DETACH" = 1 ]; then
  REMOTE="$PREFIX (nohup $EASYRL > \"$LOG_FILE\" 2>&1 < /dev/null &) && echo \"started on \$(hostname): $LOG_FILE\""
else
  REMOTE="set -o pipefail; $PREFIX $EASYRL 2>&1 | tee \"$LOG_FILE\""
fi

rc=0
on_workers all "$REMOTE" || rc=$?
if [ "$DETACH" = 1 ]; then
  is_dry_run || note "detached; collect the logs with: $0 --fetch-logs $RUN_NAME"
elif [ "$FETCH" = 1 ]; then
  fetch_logs "$RUN_NAME" || true
fi
exit "$rc"
