#!/usr/bin/env bash
# Create the TPU VM pod described by tpu_scripts/env.sh.
set -euo pipefail
# shellcheck source=common.sh
. "$(dirname "$0")/common.sh"

usage() {
  cat << EOF2
Usage: $PROG [--preemptible | --spot] [--dry-run] [--env FILE] [-- EXTRA_GCLOUD_ARGS...]

Create the TPU VM pod \$TPU_NAME:
  gcloud compute tpus tpu-vm create \$TPU_NAME --zone=\$ZONE --accelerator-type=\$ACCELERATOR_TYPE --version=\$RUNTIME_VERSION

Options:
  --preemptible   a preemptible pod (cheaper, may be stopped, at most 24 h)
  --spot          a Spot pod (cheaper, may be stopped any time, no time limit)
  -- ARGS...      passed on to gcloud (e.g. --network=NET --subnetwork=SUB --internal-ips --tags=T)

EOF2
  settings_help
}

CAPACITY=''
script_option() {
  case "$1" in
    --preemptible | --spot)
      [ -z "$CAPACITY" ] || [ "$CAPACITY" = "$1" ] || usage_error "--preemptible and --spot exclude each other"
      CAPACITY=$1
      ;;
    *) return 1 ;;
  esac
}
parse_options dashdash "$@"
shift "$OPTIONS_USED"
finish_options

gcloud_tpu create "$TPU_NAME" --zone="$ZONE" --accelerator-type="$ACCELERATOR_TYPE" \
  --version="$RUNTIME_VERSION" ${SERVICE_ACCOUNT:+"--service-account=$SERVICE_ACCOUNT"} \
  ${CAPACITY:+"$CAPACITY"} "$@"
