#!/usr/bin/env bash
# Run an rlhf_jax job on every worker of a Cloud TPU pod slice, its run directory in a GCS bucket.
#
#   launch/tpu_pod.sh [--spot] [--gcsfuse] NAME ZONE ACCELERATOR --workdir=gs://BUCKET/PATH -- \
#       python -m rlhf_jax sweep --config=experiments/paper_sweep.py
#
# Creates the TPU VM if it does not exist, copies this checkout to every worker, installs the
# package and starts the same command on all workers at once (JAX SPMD: one process per host)
# with --workdir=gs://BUCKET/PATH --jax_distributed. The run directory has to be one that every
# worker sees (orbax's multi-host checkpoints are written by all hosts into one directory) and
# that outlives the slice (a preempted slice comes back with fresh disks): hence a bucket.
#
# By default the job gets the gs:// URL itself and writes the bucket directly: its files through
# rlhf_jax.storage (etils.epath over gcsfs, installed with the package), its checkpoints through
# orbax and tensorstore's GCS driver. Objects are written where they belong, never renamed as
# directories through a FUSE mount (a copy of every object at 810M-52B parameters, atomic only on
# a hierarchical-namespace bucket): orbax commits a checkpoint on GCS with its own marker file,
# written last. No mount, no root, nothing more to install; credentials are the VM's service
# account (application default credentials), as for gcloud. The sweep checks at start that it
# can write there (a missing bucket or refused credentials: one line, exit 2).
# --gcsfuse instead mounts the bucket with gcsfuse at /mnt/gcs/BUCKET on every worker and passes
# --workdir=/mnt/gcs/BUCKET/PATH: for a user who wants the bucket as a filesystem there too, e.g.
# to read data from it.
#
# Exit status: the job's (2: a mistake in the command line or config). 75 means preempted: the
# sweep, the online job and every trainer exit 75 after checkpointing on SIGTERM; this script exits 75
# when the slice went away under the job. Run the same command again: a PREEMPTED slice is deleted and created anew (a
# deleted one just created) and the job resumes from stage_done.json and the checkpoints in the
# bucket. --spot creates the slice as a Spot VM. TPU_SOFTWARE_VERSION picks the runtime image.
# RLHF_JAX_DATA_DIR, if set, is set on every worker: a path they all see (the checkout travels,
# the data do not, and the data loaders read local paths, not gs:// URLs): a folder of the job's
# bucket under /mnt/gcs/BUCKET with --gcsfuse, or a copy of the data on every worker.
set -euo pipefail
usage="usage: launch/tpu_pod.sh [--spot] [--gcsfuse] NAME ZONE ACCELERATOR --workdir=gs://BUCKET/PATH -- COMMAND..."
refuse() { echo "tpu_pod.sh: $*" >&2; exit 2; }
why="every worker must see the same run directory, and a preempted slice loses its disks"

spot="" gcsfuse="" workdir="" args=()
while (( $# )) && [[ $1 != -- ]]; do
  case $1 in
    --spot) spot=--spot ;;
    --gcsfuse) gcsfuse=1 ;;
    --workdir=*) workdir=${1#--workdir=} ;;
    --workdir) (( $# > 1 )) || refuse "--workdir needs a value; $usage"; workdir=$2; shift ;;
    -*) refuse "unknown option $1; $usage" ;;
    *) args+=("$1") ;;
  esac
  shift
done
if (( $# )); then shift; fi
(( ${#args[@]} == 3 )) || refuse "NAME ZONE ACCELERATOR expected; $usage"
(( $# )) || refuse "no command after --; $usage"
name=${args[0]} zone=${args[1]} accel=${args[2]}
[[ -n $workdir ]] || refuse "--workdir=gs://BUCKET/PATH is required: $why"
[[ $workdir =~ ^gs://([a-z0-9][-a-z0-9_.]*)/+([^/](.*[^/])?)/*$ ]] ||
  refuse "--workdir=$workdir is not a gs://BUCKET/PATH URL: $why"
bucket=${BASH_REMATCH[1]} mount=/mnt/gcs/${BASH_REMATCH[1]}
if [[ $gcsfuse ]]; then
  job_workdir=$mount/${BASH_REMATCH[2]}
else
  job_workdir=gs://$bucket/${BASH_REMATCH[2]}
fi
for arg in "$@"; do
  case $arg in --workdir|--workdir=*) refuse "give the run directory to tpu_pod.sh, not to the command: $arg" ;; esac
done
data_dir=${RLHF_JAX_DATA_DIR:-}
# The data loaders read local paths; only the workdir's bucket is mounted, and only with --gcsfuse.
copy="or copy the data onto every worker and pass that path"
if [[ $data_dir == gs://* ]]; then
  in_bucket=$mount/PATH
  if [[ $data_dir == "gs://$bucket/"?* ]]; then in_bucket=$mount/${data_dir#"gs://$bucket/"}; fi
  refuse "RLHF_JAX_DATA_DIR=$data_dir: the data loaders read local paths, not gs:// URLs; put the data" \
    "in gs://$bucket, run with --gcsfuse and pass RLHF_JAX_DATA_DIR=$in_bucket, $copy"
elif [[ $data_dir == /mnt/gcs/* && ! ( $gcsfuse && $data_dir == "$mount"/* ) ]]; then
  refuse "RLHF_JAX_DATA_DIR=$data_dir: only --gcsfuse mounts a bucket on the workers, and only the" \
    "workdir's, at $mount: run with --gcsfuse and pass a path under $mount, $copy"
fi

# Runs on every worker, sent over ssh as its source (declare -f): no quoting of its body.
# shellcheck disable=SC2329
on_worker() {
  set -euo pipefail
  local bucket=$1 gcsfuse=$2 workdir=$3 data_dir=$4 mount=/mnt/gcs/$1
  shift 4
  if [[ $gcsfuse ]] && ! command -v gcsfuse >/dev/null; then  # Google's apt repository for Cloud Storage FUSE
    local key=/usr/share/keyrings/cloud.google.asc repo=https://packages.cloud.google.com/apt
    curl -fsSL "$repo/doc/apt-key.gpg" | sudo tee "$key" >/dev/null
    echo "deb [signed-by=$key] $repo gcsfuse-$(lsb_release -cs) main" |
      sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null
    sudo apt-get update -q && sudo apt-get install -y -q gcsfuse
  fi
  if [[ $gcsfuse ]] && ! mountpoint -q "$mount"; then
    sudo mkdir -p "$mount" && sudo chown "$(id -u):$(id -g)" "$mount"
    # --implicit-dirs: directories that exist only as object-name prefixes are seen. Renames on
    # gcsfuse are copy + delete, not atomic: a file renamed into place appears whole (GCS writes
    # an object whole), but a write killed midway can leave its temporary file behind. The stage
    # markers are written last (stage_done.json through such a temporary file), so a stage is
    # either marked done with its outputs complete or run again. --rename-dir-limit lets orbax
    # rename a finished checkpoint's temporary directory into place; a rename cut short leaves a
    # step that does not restore, which a resumed run moves aside to checkpoints_corrupt/ (a
    # bucket with hierarchical namespace renames folders atomically). No metadata cache: a host
    # must see at once what another has just written (stage_done.json, checkpoints).
    gcsfuse --implicit-dirs --rename-dir-limit=200000 --metadata-cache-ttl-secs=0 \
      --metadata-cache-negative-ttl-secs=0 "$bucket" "$mount"
  fi
  # A fresh copy of the checkout (files deleted locally must not linger), keeping the venv.
  mkdir -p ~/rlhf_jax && find ~/rlhf_jax -mindepth 1 -maxdepth 1 ! -name .venv -exec rm -rf {} +
  tar xzf ~/rlhf_jax.tgz -C ~/rlhf_jax && cd ~/rlhf_jax
  # The package needs Python >= 3.11 and the TPU images ship an older one: uv brings its own.
  export PATH=$HOME/.local/bin:$PATH
  command -v uv >/dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh
  [[ -x .venv/bin/python ]] || uv venv -q --python 3.11 .venv
  uv pip install -q --python .venv/bin/python -e . 'jax[tpu]'
  if [[ -n $data_dir ]]; then export RLHF_JAX_DATA_DIR=$data_dir; fi
  exec ".venv/bin/$1" "${@:2}" --workdir="$workdir" --jax_distributed
}

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# The slice's state, or MISSING (never created, or deleted); any other failure stops the script.
slice_state() {
  local out
  if out=$(gcloud compute tpus tpu-vm describe "$name" --zone "$zone" --format='value(state)' 2>"$tmp/err"); then
    echo "$out"
  elif grep -q NOT_FOUND "$tmp/err"; then
    echo MISSING
  else
    cat "$tmp/err" >&2; return 1
  fi
}
create() {
  gcloud compute tpus tpu-vm create "$name" --zone "$zone" --accelerator-type "$accel" \
    --version "${TPU_SOFTWARE_VERSION:-tpu-ubuntu2204-base}" ${spot:+"$spot"}
}

state=$(slice_state)
case $state in
  READY) ;;
  MISSING) create ;;
  PREEMPTED | TERMINATED)  # a preempted VM cannot be restarted, only replaced; the bucket keeps the run
    echo "tpu_pod.sh: $name is $state: recreating it; the job resumes from $workdir" >&2
    gcloud compute tpus tpu-vm delete "$name" --zone "$zone" --quiet
    create ;;
  STOPPED) gcloud compute tpus tpu-vm start "$name" --zone "$zone" ;;
  *) echo "tpu_pod.sh: $name is $state; run this again once it is READY (or delete it)" >&2; exit 1 ;;
esac

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
tar czf "$tmp/rlhf_jax.tgz" -C "$repo" --exclude=./.venv --exclude=./runs --exclude=./.git \
  --exclude=__pycache__ --exclude='*.egg-info' .
gcloud compute tpus tpu-vm scp "$tmp/rlhf_jax.tgz" "$name":rlhf_jax.tgz --zone "$zone" --worker=all
status=0
gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" --worker=all \
  --command "$(declare -f on_worker); on_worker $(printf '%q ' "$bucket" "$gcsfuse" "$job_workdir" "$data_dir" "$@")" || status=$?
# gcloud exits with the first failing worker's status; a slice that vanished shows up as ssh
# failures, which the slice's state tells apart from the job's own failure.
if (( status != 0 && status != 75 )); then
  state=$(slice_state) || state=UNKNOWN
  if [[ $state == PREEMPTED || $state == TERMINATED || $state == MISSING ]]; then
    echo "tpu_pod.sh: $name was preempted ($state); run the same command again to resume from $workdir" >&2
    exit 75
  fi
fi
exit "$status"
