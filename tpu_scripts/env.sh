# shellcheck shell=bash
# easyrl TPU pod settings: sourced by every script in tpu_scripts/ (through common.sh).
#
# Edit the defaults here, or override any of them from the environment:
#     TPU_NAME=rlhf-v5e ACCELERATOR_TYPE=v5e-256 ZONE=us-west4-a ./tpu_scripts/create.sh
# or keep several setups in files of your own and pick one with `--env FILE` (or EASYRL_TPU_ENV=FILE).
# Such a file is sourced *before* this one, so it only needs the variables it changes; plain
# assignments there (PROJECT=foo) win over the environment, `: "${PROJECT:=foo}"` ones do not.

# ---- the pod -----------------------------------------------------------------------------------
# GCP project; empty = whatever `gcloud config get-value project` says.
: "${PROJECT:=}"
: "${ZONE:=us-central2-b}"
: "${TPU_NAME:=easyrl-pod}"
# TPU type as gcloud spells it: v4-32, v5litepod-256, v5p-128, v6e-64, ... The marketing names
# v5e-N are accepted and rewritten to v5litepod-N below.
: "${ACCELERATOR_TYPE:=v4-32}"
case "$ACCELERATOR_TYPE" in
  v5e-*) ACCELERATOR_TYPE="v5litepod-${ACCELERATOR_TYPE#v5e-}" ;;
esac
# TPU VM image. The default follows the TPU generation; set it to pin another one.
if [ -z "${RUNTIME_VERSION:-}" ]; then
  case "$ACCELERATOR_TYPE" in
    v5litepod-*) RUNTIME_VERSION=v2-alpha-tpuv5-lite ;;
    v5p-*) RUNTIME_VERSION=v2-alpha-tpuv5 ;;
    v6e-*) RUNTIME_VERSION=v2-alpha-tpuv6e ;;
    *) RUNTIME_VERSION=tpu-ubuntu2204-base ;;
  esac
fi
# Optional service account for the VMs (it needs read/write on $BUCKET); empty = the default one.
: "${SERVICE_ACCOUNT:=}"

# ---- the code ----------------------------------------------------------------------------------
# setup.sh clones REPO_URL at BRANCH on every worker; with REPO_URL empty (or `setup.sh --local`)
# it ships this checkout's working tree instead (tracked + untracked, not ignored, files).
: "${REPO_URL:=}"
: "${BRANCH:=main}"
# Where the repo lives on every worker (relative paths are relative to the remote $HOME).
: "${REMOTE_DIR:=easyrl}"
# Python on the workers (the TPU VM images ship python3, not always `python`). Inserted into the
# remote command as written, so e.g. PYTHON='~/venv/bin/python' works.
: "${PYTHON:=python3}"
# Extra `pip install` arguments; the find-links page serves libtpu wheels for older jax releases.
: "${PIP_ARGS:=-f https://storage.googleapis.com/jax-releases/libtpu_releases.html}"

# ---- data and checkpoints ----------------------------------------------------------------------
# One GCS bucket (name, without gs://) for datasets and runs. orbax and tensorstore read and
# write gs:// paths directly: pass e.g. --config.output_dir=$GCS_RUNS/ppo to launch.sh.
: "${BUCKET:=my-easyrl-bucket}"
: "${GCS_DATA:=gs://$BUCKET/data}"
: "${GCS_RUNS:=gs://$BUCKET/runs}"

# ---- XLA / libtpu flags exported on every worker by launch.sh ----------------------------------
# Overlap the data-parallel / FSDP collectives with compute (the usual flags for large pods).
: "${LIBTPU_INIT_ARGS:=--xla_tpu_enable_data_parallel_all_reduce_opt=true --xla_tpu_data_parallel_opt_different_sized_ops=true --xla_tpu_enable_async_collective_fusion=true --xla_tpu_enable_async_collective_fusion_fuse_all_gather=true --xla_tpu_enable_async_collective_fusion_multiple_steps=true --xla_tpu_overlap_compute_collective_tc=true --xla_enable_async_all_gather=true}"

# ---- local side --------------------------------------------------------------------------------
# Where launch.sh collects the per-worker logs: $LOCAL_LOG_DIR/<TPU_NAME>/<run>/<worker host>.log
: "${LOCAL_LOG_DIR:=./logs}"
