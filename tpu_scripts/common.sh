# shellcheck shell=bash
# Helpers shared by the tpu_scripts/*.sh commands; sourced, never run. Written for bash >= 3.2
# (the macOS /bin/bash) so that the scripts run from a laptop as well as from a Linux box:
# no arrays, no associative arrays, no ${var,,}.
#
#   run CMD ARGS...      print the command, shell-quoted, then run it -- or only print it when
#                        dry-running (--dry-run or DRY_RUN=1). Printed to stdout when dry-running
#                        (so `./create.sh --dry-run > cmds.sh` gives a script) and to stderr
#                        otherwise (so stdout stays the commands' own output).
#   gcloud_tpu SUB ...   run gcloud compute tpus tpu-vm SUB ... [--project=$PROJECT]
#   on_workers W CMD     run the shell command CMD on worker W (a number or `all`) of the pod.
#   parse_options ...    the option loop of every script: --help, --dry-run and --env here, the
#                        script's own options in its script_option function.

PROG=$(basename "$0")
TPU_SCRIPTS_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
DRY_RUN=${DRY_RUN:-0}
ENV_FILE=${EASYRL_TPU_ENV:-}
WANT_HELP=0
SHIFT_BY=1
OPTIONS_USED=0
OPTION_VALUE=''
UNKNOWN_HINT=''

die() {
  printf '%s: error: %s\n' "$PROG" "$*" >&2
  exit 2
}

note() {
  printf '%s: %s\n' "$PROG" "$*" >&2
}

is_dry_run() {
  case "$DRY_RUN" in
    '' | 0 | false | False | FALSE | no | No | NO) return 1 ;;
    *) return 0 ;;
  esac
}

# shquote WORD: WORD as one shell word, re-readable by sh/bash. Plain words stay as they are,
# others get single quotes; words with control characters (newlines, tabs) fall back to bash's
# printf %q ($'...' form) so that a printed command always stays on one line.
shquote() {
  case "$1" in
    '') printf "''" ;;
    *[[:cntrl:]]*) printf '%q' "$1" ;;
    *[!A-Za-z0-9_@%+=:,./-]*)
      local rest=$1 out=''
      while :; do
        case "$rest" in
          *"'"*)
            out="$out${rest%%"'"*}'\\''"
            rest=${rest#*"'"}
            ;;
          *)
            out="$out$rest"
            break
            ;;
        esac
      done
      printf "'%s'" "$out"
      ;;
    *) printf '%s' "$1" ;;
  esac
}

# shquote_arg WORD: as shquote, but of an --option=value word only the value is quoted
# (--command='cd x && ...' reads better than '--command=cd x && ...'; same word to the shell).
shquote_arg() {
  case "$1" in
    -*=*)
      case "${1%%=*}" in
        *[!A-Za-z0-9_.-]*) shquote "$1" ;;
        *)
          printf '%s=' "${1%%=*}"
          shquote "${1#*=}"
          ;;
      esac
      ;;
    *) shquote "$1" ;;
  esac
}

# shjoin WORDS...: the words quoted with shquote_arg and joined by spaces.
shjoin() {
  local sep=''
  while [ $# -gt 0 ]; do
    printf '%s' "$sep"
    shquote_arg "$1"
    sep=' '
    shift
  done
}

run() {
  if is_dry_run; then
    printf '+ %s\n' "$(shjoin "$@")"
    return 0
  fi
  printf '+ %s\n' "$(shjoin "$@")" >&2
  "$@"
}

# parse_options ENDS "$@": the option loop of every script. Each argument goes first to the
# script's own `script_option "$@"` (which, like common_option, handles the options at the front
# of its arguments: sets SHIFT_BY to how many it used, returns 1 when "$1" is not one of its
# options), then to common_option; any other argument is an "unknown option" usage error
# (followed by UNKNOWN_HINT) -- unless ENDS says it ends the options:
#   none      every argument is an option
#   dashdash  `--` ends the options; the arguments after it are the script's
#   command   `--`, or the first word that does not start with -, ends them (COMMAND ARGS...)
# Sets OPTIONS_USED, how many arguments were options (`--` included): the script goes on with
# `shift "$OPTIONS_USED"` to the arguments that are left. (script_option runs as an `if` condition,
# where set -e does not apply: it stops on a bad value with usage_error, not with a failing command.)
parse_options() {
  local ends=$1
  shift
  OPTIONS_USED=0
  while [ $# -gt 0 ]; do
    SHIFT_BY=1
    if script_option "$@"; then
      :
    elif [ "$ends" != none ] && [ "$1" = -- ]; then
      OPTIONS_USED=$((OPTIONS_USED + 1))
      return 0
    elif [ "$ends" = command ] && [ "${1#-}" = "$1" ]; then
      return 0
    elif ! common_option "$@"; then
      usage_error "unknown option: $1$UNKNOWN_HINT"
    fi
    OPTIONS_USED=$((OPTIONS_USED + SHIFT_BY))
    shift "$SHIFT_BY"
  done
}

# common_option "$@": handle an option every script takes, as script_option does.
common_option() {
  SHIFT_BY=1
  case "$1" in
    -h | --help) WANT_HELP=1 ;;
    -n | --dry-run) DRY_RUN=1 ;;
    --env)
      [ $# -ge 2 ] || die "--env needs a file"
      ENV_FILE=$2
      SHIFT_BY=2
      ;;
    --env=*) ENV_FILE=${1#--env=} ;;
    *) return 1 ;;
  esac
}

# option_value "$@": for script_option, the value of option "$1" into OPTION_VALUE -- what follows
# the = of --opt=VALUE, else the next argument (then SHIFT_BY=2; a usage error when there is none).
# shellcheck disable=SC2034  # OPTION_VALUE is read by the scripts that source this file
option_value() {
  case "$1" in
    --*=*) OPTION_VALUE=${1#*=} ;;
    *)
      need_value "$@"
      OPTION_VALUE=$2
      SHIFT_BY=2
      ;;
  esac
}

# load_env: source --env FILE (if any), then env.sh for every default that is still unset.
load_env() {
  if [ -n "$ENV_FILE" ]; then
    [ -f "$ENV_FILE" ] || die "env file not found: $ENV_FILE"
    # shellcheck source=/dev/null
    . "$ENV_FILE"
  fi
  # shellcheck source=env.sh
  . "$TPU_SCRIPTS_DIR/env.sh"
  [ -n "$TPU_NAME" ] || die "TPU_NAME is empty (set it in tpu_scripts/env.sh or the environment)"
  [ -n "$ZONE" ] || die "ZONE is empty (set it in tpu_scripts/env.sh or the environment)"
}

# finish_options: after the option loop -- load the settings, answer --help, check for gcloud.
finish_options() {
  load_env
  if [ "$WANT_HELP" = 1 ]; then
    usage
    exit 0
  fi
  if ! is_dry_run && ! command -v gcloud > /dev/null 2>&1; then
    die "gcloud not found: install the Google Cloud CLI (https://cloud.google.com/sdk) or use --dry-run"
  fi
}

# need_value "$@": die unless option "$1" has a value after it.
need_value() {
  [ $# -ge 2 ] || usage_error "$1 needs a value"
}

usage_error() {
  printf '%s: error: %s\n' "$PROG" "$*" >&2
  printf "Try '%s --help'.\n" "$PROG" >&2
  exit 2
}

gcloud_tpu() {
  run gcloud compute tpus tpu-vm "$@" ${PROJECT:+"--project=$PROJECT"}
}

on_workers() {
  gcloud_tpu ssh "$TPU_NAME" --zone="$ZONE" --worker="$1" --command="$2"
}

# estimate_workers TYPE: the number of TPU VM hosts of a slice of that type (v2/v3/v4/v5p-N count
# TensorCores, 8 per host; v5litepod/v6e-N count chips: 8 on a single host up to -8, 4 per host
# beyond). Prints nothing for an unknown type.
estimate_workers() {
  local n=${1##*-}
  case "$n" in '' | *[!0-9]*) return 0 ;; esac
  case "$1" in
    v2-* | v3-* | v4-* | v5p-*) n=$((n / 8)) ;;
    v5litepod-* | v6e-*) if [ "$n" -le 8 ]; then n=1; else n=$((n / 4)); fi ;;
    *) return 0 ;;
  esac
  [ "$n" -ge 1 ] || n=1
  echo "$n"
}

# worker_count: how many workers (hosts) the pod has -- NUM_WORKERS when set, else asked from
# gcloud (describe), else (dry-run, or gcloud gave nothing) estimated from ACCELERATOR_TYPE.
worker_count() {
  local n=${NUM_WORKERS:-}
  if [ -z "$n" ] && ! is_dry_run; then
    printf '+ %s\n' "$(shjoin gcloud compute tpus tpu-vm describe "$TPU_NAME" --zone="$ZONE" \
      --format='value(networkEndpoints.len())' ${PROJECT:+"--project=$PROJECT"})" >&2
    n=$(gcloud compute tpus tpu-vm describe "$TPU_NAME" --zone="$ZONE" \
      --format='value(networkEndpoints.len())' ${PROJECT:+"--project=$PROJECT"}) || n=''
  fi
  if [ -z "$n" ]; then
    n=$(estimate_workers "$ACCELERATOR_TYPE")
    [ -z "$n" ] || note "$n workers, estimated from ACCELERATOR_TYPE=$ACCELERATOR_TYPE (set NUM_WORKERS to override)"
  fi
  case "$n" in
    '' | *[!0-9]* | 0) die "cannot tell how many workers $TPU_NAME ($ACCELERATOR_TYPE) has; set NUM_WORKERS" ;;
  esac
  echo "$n"
}

# The settings every usage text ends with.
settings_help() {
  cat << EOF
Settings (tpu_scripts/env.sh, overridable from the environment or with --env FILE):
  PROJECT=${PROJECT:-<gcloud default>} ZONE=$ZONE TPU_NAME=$TPU_NAME
  ACCELERATOR_TYPE=$ACCELERATOR_TYPE RUNTIME_VERSION=$RUNTIME_VERSION

Common options:
  -n, --dry-run   print the exact commands instead of running them (also DRY_RUN=1)
  --env FILE      source FILE before tpu_scripts/env.sh (also EASYRL_TPU_ENV=FILE)
  -h, --help      this text
EOF
}
