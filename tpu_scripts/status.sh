#!/usr/bin/env bash
# Show the pod: its state, or every pod in the zone, or the easyrl processes on its workers.
set -euo pipefail
# shellcheck source=common.sh
. "$(dirname "$0")/common.sh"

usage() {
  cat << EOF2
Usage: $PROG [--list | --procs | --show-env] [--dry-run] [--env FILE]

  (default)   gcloud compute tpus tpu-vm describe \$TPU_NAME (state, health, runtime, IPs)
  --list      every TPU VM in \$ZONE
  --procs     on all workers: the running \`python -m easyrl\` processes
  --show-env  print the resolved settings (env.sh + environment + --env FILE); no gcloud call

EOF2
  settings_help
}

MODE=describe
script_option() {
  case "$1" in
    --list) MODE=list ;;
    --procs) MODE=procs ;;
    --show-env) MODE=show_env ;;
    *) return 1 ;;
  esac
}
parse_options none "$@"
[ "$MODE" != show_env ] || DRY_RUN=1  # --show-env never needs gcloud
finish_options

case "$MODE" in
  describe)
    gcloud_tpu describe "$TPU_NAME" --zone="$ZONE" \
      --format='yaml(name,state,health,healthDescription,acceleratorType,runtimeVersion,schedulingConfig,networkEndpoints[].ipAddress)'
    ;;
  list)
    gcloud_tpu list --zone="$ZONE"
    ;;
  procs)
    # [e]asyrl: the pattern does not match the shell that runs it.
    # shellcheck disable=SC2016  # $(hostname) is for the workers' shell
    on_workers all 'echo "== $(hostname)"; pgrep -af "python[0-9.]* -m [e]asyrl" || echo "no easyrl process"'
    ;;
  show_env)
    for var in PROJECT ZONE TPU_NAME ACCELERATOR_TYPE RUNTIME_VERSION SERVICE_ACCOUNT REPO_URL BRANCH \
      REMOTE_DIR PYTHON PIP_ARGS BUCKET GCS_DATA GCS_RUNS LIBTPU_INIT_ARGS LOCAL_LOG_DIR; do
      eval "value=\${$var}"
      # shellcheck disable=SC2154  # set by the eval
      printf '%s=%s\n' "$var" "$(shquote "$value")"
    done
    ;;
esac
