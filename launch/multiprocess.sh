#!/usr/bin/env bash
# N training processes on one host joined through jax.distributed (coordinator on 127.0.0.1):
# one process per GPU, or N CPU processes to try multi-process training without GPUs.
#
#   launch/multiprocess.sh N CONFIG WORKDIR [key=value ...]
#
#   launch/multiprocess.sh 4 configs/fetal_dro.yaml runs/dro            # GPUs 0..3, one per process
#   CUDA_VISIBLE_DEVICES=4,5 launch/multiprocess.sh 2 configs/fetal_erm.yaml runs/erm  # GPUs 4, 5
#   JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=4 \
#       launch/multiprocess.sh 2 configs/demo.yaml /tmp/mp              # 2 CPU processes x 4 devices
#
# Process i runs `python -m jaxseg.launch train --config CONFIG --workdir WORKDIR [key=value ...]`
# with JAXSEG_COORDINATOR=127.0.0.1:PORT (PORT: $COORDINATOR_PORT, else a free port),
# JAXSEG_NUM_PROCESSES=N, JAXSEG_PROCESS_ID=i and, unless JAX_PLATFORMS=cpu, one GPU:
# CUDA_VISIBLE_DEVICES=the i-th entry of the caller's CUDA_VISIBLE_DEVICES (else i).
# data.batch_size is the GLOBAL batch: divisible by the number of devices of all processes.
# Process 0 prints to this terminal; process i > 0 writes WORKDIR/logs/process_<i>.log.
# Waits for all; when one fails, stops the others and exits with the failed one's status.
# Ctrl-C (or SIGTERM) stops all. Running the same command again resumes from WORKDIR/ckpt.
# PYTHON picks the interpreter (default: python on PATH).
set -euo pipefail

usage() {
    # The comment block at the top of this file.
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}" >&2
}
die() {
    echo "multiprocess.sh: $*" >&2
    exit 2
}

if [[ $# -lt 3 || $1 == -h || $1 == --help ]]; then
    usage
    exit 2
fi
n=$1
config=$2
workdir=$3
shift 3
[[ $n =~ ^[1-9][0-9]*$ ]] || die "N must be a positive integer, got '$n'"
python=${PYTHON:-python}

# --- Devices: one GPU per process (none on CPU) ---------------------------------------------
gpus=()
if [[ ${JAX_PLATFORMS:-} != cpu ]]; then
    if [[ -n ${CUDA_VISIBLE_DEVICES:-} ]]; then
        IFS=, read -r -a gpus <<<"$CUDA_VISIBLE_DEVICES"
    else
        if command -v nvidia-smi >/dev/null 2>&1; then
            available=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
            if ((available > 0 && available < n)); then
                die "$n processes but nvidia-smi lists $available GPUs (one GPU per process)"
            fi
        fi
        for ((i = 0; i < n; i++)); do gpus+=("$i"); done
    fi
    ((${#gpus[@]} >= n)) || die "$n processes but CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES lists ${#gpus[@]} GPUs"
fi

# --- Coordinator port ---------------------------------------------------------------------
if [[ -n ${COORDINATOR_PORT:-} ]]; then
    port=$COORDINATOR_PORT
else
    port=$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
fi

logdir=$workdir/logs
mkdir -p "$logdir"

# --- Start ----------------------------------------------------------------------------------
pids=()
alive=()

stop_all() {
    # SIGTERM to the processes still running, SIGKILL to those left after 5 s, then reap them.
    # (After jax.distributed.initialize, JAX catches SIGTERM as a preemption notice and goes on, so
    # a started trainer usually needs the SIGKILL; checkpoints are written atomically and the same
    # command resumes exactly from the last one.)
    local i t
    for i in "${!pids[@]}"; do
        if [[ ${alive[i]} == 1 ]]; then kill -TERM "${pids[i]}" 2>/dev/null || true; fi
    done
    for ((t = 0; t < 10; t++)); do
        local any=0
        for i in "${!pids[@]}"; do
            if [[ ${alive[i]} == 1 ]] && kill -0 "${pids[i]}" 2>/dev/null; then any=1; fi
        done
        ((any)) || break
        sleep 0.5
    done
    for i in "${!pids[@]}"; do
        if [[ ${alive[i]} == 1 ]]; then
            kill -KILL "${pids[i]}" 2>/dev/null || true
            wait "${pids[i]}" 2>/dev/null || true
            alive[i]=0
        fi
    done
}
on_signal() {
    trap - INT TERM
    echo "multiprocess.sh: interrupted; stopping the $n processes" >&2
    stop_all
    exit "$1"
}
trap 'on_signal 130' INT
trap 'on_signal 143' TERM
trap 'stop_all' EXIT

for ((i = 0; i < n; i++)); do
    vars=(JAXSEG_COORDINATOR="127.0.0.1:$port" JAXSEG_NUM_PROCESSES="$n" JAXSEG_PROCESS_ID="$i")
    if ((${#gpus[@]} > 0)); then vars+=(CUDA_VISIBLE_DEVICES="${gpus[i]}"); fi
    cmd=(env "${vars[@]}" "$python" -m jaxseg.launch train --config "$config" --workdir "$workdir" "$@")
    if ((i == 0)); then
        "${cmd[@]}" &
    else
        "${cmd[@]}" >"$logdir/process_$i.log" 2>&1 &
    fi
    pids+=("$!")
    alive+=(1)
done
echo "multiprocess.sh: $n processes (pids ${pids[*]}), coordinator 127.0.0.1:$port${gpus:+, GPUs ${gpus[*]:0:n}}," \
    "logs of processes 1..$((n - 1)) in $logdir" >&2

# --- Wait for all; stop the rest at the first failure -----------------------------------------
# (Polling rather than `wait -n`: portable to old bash, and it says which process failed.)
failed=-1
status=0
left=$n
while ((left > 0 && failed < 0)); do
    for ((i = 0; i < n; i++)); do
        if [[ ${alive[i]} != 1 ]] || kill -0 "${pids[i]}" 2>/dev/null; then continue; fi
        alive[i]=0
        left=$((left - 1))
        rc=0
        wait "${pids[i]}" || rc=$?
        if ((rc != 0 && failed < 0)); then
            failed=$i
            status=$rc
        fi
    done
    if ((left > 0 && failed < 0)); then sleep 1; fi
done

if ((failed >= 0)); then
    echo "multiprocess.sh: process $failed exited with status $status; stopping the others" >&2
    stop_all
    if ((failed > 0)); then
        echo "--- last lines of $logdir/process_$failed.log:" >&2
        tail -n 40 "$logdir/process_$failed.log" >&2 || true
    fi
    exit "$status"
fi
echo "multiprocess.sh: all $n processes finished" >&2
