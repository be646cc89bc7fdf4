#!/usr/bin/env bash
# Stop the easyrl processes on every worker (e.g. after one worker crashed and the others hang,
# still holding the TPUs), so that the next launch.sh can start.
set -euo pipefail
# shellcheck source=common.sh
. "$(dirname "$0")/common.sh"

usage() {
  cat << EOF2
Usage: $PROG [--force] [--dry-run] [--env FILE]

On all workers of \$TPU_NAME: send SIGTERM to every \`python -m easyrl\` process
(--force: SIGKILL, then remove a stale /tmp/libtpu_lockfile left by a killed process).

EOF2
  settings_help
}

FORCE=0
script_option() {
  case "$1" in
    -f | --force) FORCE=1 ;;
    *) return 1 ;;
  esac
}
parse_options none "$@"
finish_options

# [e]asyrl: the pattern does not match the shell that runs it.
PATTERN='python[0-9.]* -m [e]asyrl'
if [ "$FORCE" = 1 ]; then
  on_workers all "pkill -KILL -f '$PATTERN' && echo \"killed on \$(hostname)\" || echo \"nothing running on \$(hostname)\"; sleep 1; pgrep -f '$PATTERN' > /dev/null || sudo rm -f /tmp/libtpu_lockfile"
else
  on_workers all "pkill -TERM -f '$PATTERN' && echo \"stopped on \$(hostname)\" || echo \"nothing running on \$(hostname)\""
fi
