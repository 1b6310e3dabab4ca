#!/usr/bin/env bash
# Run an rlhf_jax job on every worker of a Cloud TPU pod slice.
#
#   launch/tpu_pod.sh NAME ZONE ACCELERATOR -- python -m rlhf_jax.train_lm --config=configs/lm.py:197m \
#       --config.mesh.shape='(1,-1,1)'
#
# Creates the TPU VM if it does not exist, copies this checkout to every worker, installs the
# package, and starts the same command on all workers at once (JAX SPMD: one process per host).
# Every worker builds the same global batches; `shard_batch` places only each host's own shards.
set -euo pipefail
name=$1 zone=$2 accel=$3; shift 3
[[ ${1:-} == "--" ]] && shift
version=${TPU_SOFTWARE_VERSION:-tpu-ubuntu2204-base}

if ! gcloud compute tpus tpu-vm describe "$name" --zone "$zone" >/dev/null 2>&1; then
  gcloud compute tpus tpu-vm create "$name" --zone "$zone" --accelerator-type "$accel" --version "$version"
fi
tar czf /tmp/rlhf_jax.tgz --exclude .venv --exclude runs --exclude .git .
gcloud compute tpus tpu-vm scp /tmp/rlhf_jax.tgz "$name":~/ --zone "$zone" --worker=all
gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" --worker=all --command "
  set -e; mkdir -p rlhf_jax && tar xzf rlhf_jax.tgz -C rlhf_jax && cd rlhf_jax
  python3 -m venv .venv && .venv/bin/pip install -q -e . 'jax[tpu]'
  .venv/bin/$* --jax_distributed"
