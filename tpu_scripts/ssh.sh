#!/usr/bin/env bash
# ssh into one worker of the pod (or run a command on one worker, or on all of them).
set -euo pipefail
# shellcheck source=common.sh
. "$(dirname "$0")/common.sh"

usage() {
  cat << EOF2
Usage: $PROG [--worker=N|N,M|N-M|all] [--dry-run] [--env FILE] [--] [COMMAND...]

Without COMMAND: an interactive shell on worker N (default 0) of \$TPU_NAME.
With COMMAND: run it there (the words are joined by spaces, as ssh does) -- on every worker
at once with --worker=all, e.g.
  $PROG --worker=all -- 'cd $REMOTE_DIR && git log -1 --oneline'

EOF2
  settings_help
}

WORKER=0
script_option() {
  case "$1" in
    --worker | -w | --worker=*)
      option_value "$@"
      WORKER=$OPTION_VALUE
      ;;
    *) return 1 ;;
  esac
}
parse_options command "$@"
shift "$OPTIONS_USED"
case "$WORKER" in
  all) ;;
  '' | *[!0-9,-]*) usage_error "--worker wants a worker number (0, 1, ...), a list (0,2), a range (1-3) or all; got: $WORKER" ;;
esac
case "$#:$WORKER" in
  0:*[!0-9]*) usage_error "an interactive shell goes to one worker (--worker=N); give a COMMAND for --worker=$WORKER" ;;
esac
finish_options

if [ $# -eq 0 ]; then
  gcloud_tpu ssh "$TPU_NAME" --zone="$ZONE" --worker="$WORKER"
else
  on_workers "$WORKER" "$*"
fi
