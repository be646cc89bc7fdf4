#!/usr/bin/env bash
# Delete the pod (asks first unless --yes).
set -euo pipefail
# shellcheck source=common.sh
. "$(dirname "$0")/common.sh"

usage() {
  cat << EOF2
Usage: $PROG [--yes] [--dry-run] [--env FILE] [-- EXTRA_GCLOUD_ARGS...]

Delete the TPU VM pod \$TPU_NAME in \$ZONE, after asking for confirmation on the terminal
(--yes skips the question; --dry-run only prints the command and asks nothing).
Disks and local files of the workers go with it; gs:// data and checkpoints stay.

EOF2
  settings_help
}

YES=0
script_option() {
  case "$1" in
    -y | --yes) YES=1 ;;
    *) return 1 ;;
  esac
}
parse_options dashdash "$@"
shift "$OPTIONS_USED"
finish_options

if [ "$YES" != 1 ] && ! is_dry_run; then
  answer=''
  printf 'Delete TPU %s in zone %s%s? [y/N] ' "$TPU_NAME" "$ZONE" "${PROJECT:+ (project $PROJECT)}" >&2
  read -r answer || true
  case "$answer" in
    y | Y | yes | YES | Yes) ;;
    *)
      note "not deleted"
      exit 1
      ;;
  esac
fi
# --quiet: the question was asked above, gcloud need not ask again.
gcloud_tpu delete "$TPU_NAME" --zone="$ZONE" --quiet "$@"
