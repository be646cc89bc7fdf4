#!/usr/bin/env bash
# Put the code on every worker of the pod, install it, and check that JAX sees the TPUs.
set -euo pipefail
# shellcheck source=common.sh
. "$(dirname "$0")/common.sh"

usage() {
  cat << EOF2
Usage: $PROG [--git | --local] [--no-install] [--no-check] [--dry-run] [--env FILE]

On all workers of \$TPU_NAME (gcloud ... ssh --worker=all):
  1. code: --git   clone \$REPO_URL at \$BRANCH into \$REMOTE_DIR (or fetch + check it out again
                   when already there; the workers mirror the branch, local edits there are lost)
           --local pack this checkout's working tree (tracked and untracked files that git does
                   not ignore, uncommitted edits included), scp it to every worker, unpack it
                   into \$REMOTE_DIR
           default: --git when REPO_URL is set, else --local
  2. install: \$PYTHON -m pip install \$PIP_ARGS -e '.[tpu]'      (skip with --no-install)
  3. check:   \$PYTHON -c "import jax; print(jax.device_count())"  (skip with --no-check)

Now: REPO_URL=${REPO_URL:-<empty>} BRANCH=$BRANCH REMOTE_DIR=$REMOTE_DIR PYTHON=$PYTHON

EOF2
  settings_help
}

SOURCE=''
INSTALL=1
CHECK=1
script_option() {
  case "$1" in
    --git) SOURCE=git ;;
    --local | --rsync) SOURCE=local ;;
    --no-install) INSTALL=0 ;;
    --no-check) CHECK=0 ;;
    *) return 1 ;;
  esac
}
parse_options none "$@"
finish_options

if [ -z "$SOURCE" ]; then
  if [ -n "$REPO_URL" ]; then SOURCE=git; else SOURCE=local; fi
fi
DIR_Q=$(shquote "$REMOTE_DIR")

# ---- 1. the code -------------------------------------------------------------------------------
if [ "$SOURCE" = git ]; then
  [ -n "$REPO_URL" ] || die "--git needs REPO_URL (tpu_scripts/env.sh or the environment)"
  URL_Q=$(shquote "$REPO_URL")
  BRANCH_Q=$(shquote "$BRANCH")
  on_workers all "if [ -d $DIR_Q/.git ]; then git -C $DIR_Q fetch --quiet origin $BRANCH_Q && git -C $DIR_Q checkout --quiet --force -B $BRANCH_Q FETCH_HEAD; else git clone --quiet --branch $BRANCH_Q $URL_Q $DIR_Q; fi && git -C $DIR_Q log -1 --format=\"%h %s\""
else
  REPO_ROOT=$(git -C "$TPU_SCRIPTS_DIR" rev-parse --show-toplevel 2> /dev/null) ||
    die "--local needs a git checkout around $TPU_SCRIPTS_DIR (or set REPO_URL and use --git)"
  TARBALL_NAME="easyrl-src-$TPU_NAME.tar.gz"
  TARBALL="${TMPDIR:-/tmp}/$TARBALL_NAME"
  TARBALL=${TARBALL//\/\//\/}
  # A scratch index holding every non-ignored file as it is on disk -> a tree -> git archive.
  # Files deleted on disk stay out, unlike with `git ls-files | tar`; plain git, so it runs on macOS.
  # shellcheck disable=SC2016  # $1..$3 are for the inner sh
  run sh -c 'rm -f "$2" && GIT_INDEX_FILE="$2" git -C "$1" add -A && git -C "$1" archive --format=tar.gz -o "$3" "$(GIT_INDEX_FILE="$2" git -C "$1" write-tree)" && rm -f "$2"' \
    pack-worktree "$REPO_ROOT" "$TARBALL.index" "$TARBALL"
  gcloud_tpu scp "$TARBALL" "$TPU_NAME:" --zone="$ZONE" --worker=all
  NAME_Q=$(shquote "$TARBALL_NAME")
  on_workers all "mkdir -p $DIR_Q && tar -xzf $NAME_Q -C $DIR_Q && rm -f $NAME_Q"
  run rm -f "$TARBALL"
fi

# ---- 2. install ---------------------------------------------------------------------------------
# PIP_ARGS is inserted as written: it is shell words by design (e.g. "-f URL --upgrade").
if [ "$INSTALL" = 1 ]; then
  on_workers all "cd $DIR_Q && $PYTHON -m pip install --quiet --upgrade pip && $PYTHON -m pip install $PIP_ARGS -e \".[tpu]\""
fi

# ---- 3. check -----------------------------------------------------------------------------------
if [ "$CHECK" = 1 ]; then
  on_workers all "$PYTHON -c \"import jax; print(jax.device_count())\""
fi
