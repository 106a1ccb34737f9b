#!/usr/bin/env bash
# One host, one process, all local GPUs: JAX sees every visible GPU and the global batch
# (data.batch_size, divisible by the number of GPUs) is split over them.
#
#   launch/local.sh CONFIG WORKDIR [key=value ...]
#
#   launch/local.sh configs/fetal_dro.yaml runs/fetal_dro data.store=/data/fetal_store
#   CUDA_VISIBLE_DEVICES=0,1 launch/local.sh configs/fetal_erm.yaml runs/erm     # only GPUs 0 and 1
#   PYTHON=.venv/bin/python launch/local.sh configs/demo.yaml runs/demo train.epochs=2
#
# Runs `python -m jaxseg.launch train --config CONFIG --workdir WORKDIR [key=value ...]`.
# Running the same command again resumes from WORKDIR/ckpt (a changed trajectory setting is
# refused). PYTHON picks the interpreter (default: python on PATH). Exit status: the trainer's.
set -euo pipefail

usage() {
    # The comment block at the top of this file.
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}" >&2
}

if [[ $# -lt 2 || $1 == -h || $1 == --help ]]; then
    usage
    exit 2
fi
config=$1
workdir=$2
shift 2

# One process: variables left over from a multi-process launch must not make it wait for peers.
unset JAXSEG_COORDINATOR JAXSEG_NUM_PROCESSES JAXSEG_PROCESS_ID

exec "${PYTHON:-python}" -m jaxseg.launch train --config "$config" --workdir "$workdir" "$@"
