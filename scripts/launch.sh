#!/usr/bin/env bash
# Run mora-train on several processes with `accelerate launch`: GPUs of one machine, several machines,
# or CPU processes (a smoke test). Everything after the launcher options goes to mora-train as Hydra
# overrides; pick the engine there with distributed=none|ddp|fsdp|zero2|zero3|zero3_offload|multinode.
#
#   scripts/launch.sh --gpus 1 distributed=zero3 adapter=mora            # one GPU (DeepSpeed/FSDP need a launcher)
#   scripts/launch.sh --gpus 8 distributed=zero3 adapter=mora model=llama2-7b trainer.precision=bf16
#   scripts/launch.sh --nodes 2 --node-rank 0 --main-ip 10.0.0.1 --gpus 8 \
#       distributed=multinode output_dir=/shared/runs/r1                 # then --node-rank 1 on the second node
#   scripts/launch.sh --cpu 2 model=tiny-llama trainer.max_steps=10      # 2 CPU processes (gloo)
#   scripts/launch.sh --print --gpus 8 distributed=fsdp                  # show the command, run nothing
#
# Options:  --gpus N (per node, default 1)  --nodes M (default 1)  --node-rank R (default 0)
#           --main-ip IP (node 0's address; required with --nodes > 1)  --main-port P (default 29500)
#           --cpu N (N CPU processes instead of GPUs)  --print (print the command only)
# Environment: PYTHON (default: the repository's .venv/bin/python when present, else python3; it must
#              have mora-train installed, as scripts/setup.sh does),
#              ACCELERATE_ARGS (extra `accelerate launch` flags, e.g. "--gpu_ids 0,1").
set -euo pipefail
# Run from the caller's directory (relative output_dir=... and outputs/ land there); find files via the repo.
repo=$(cd "$(dirname "$0")/.." && pwd)

gpus=1 nodes=1 node_rank=0 main_ip="" main_port=29500 cpu=0 print_only=0
while [ $# -gt 0 ]; do
    case "$1" in
        --gpus) gpus=$2; shift 2 ;;
        --nodes) nodes=$2; shift 2 ;;
        --node-rank) node_rank=$2; shift 2 ;;
        --main-ip) main_ip=$2; shift 2 ;;
        --main-port) main_port=$2; shift 2 ;;
        --cpu) cpu=$2; shift 2 ;;
        --print) print_only=1; shift ;;
        -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
        *) break ;;
    esac
done

if [ -n "${PYTHON:-}" ]; then
    py=$PYTHON
elif [ -x "$repo/.venv/bin/python" ]; then
    py=$repo/.venv/bin/python
else
    py=python3
fi
configs=$repo/mora_train/configs/distributed/accelerate
launch=("$py" -m accelerate.commands.launch)

if [ "$cpu" -gt 0 ]; then
    # accelerate's --cpu launcher starts one process unless MPI is set up; its multi-process (torchrun)
    # launcher works on CPU too: mora-train then trains on CPU with the gloo backend.
    launch+=(--multi_gpu --num_processes "$cpu" --num_machines 1 --mixed_precision no --dynamo_backend no
        --main_process_port 0)  # 0: a free port, so several smoke tests can share a machine
elif [ "$nodes" -gt 1 ]; then
    if [ -z "$main_ip" ]; then
        echo "launch.sh: --nodes $nodes needs --main-ip (the address of node 0, reachable from every node)" >&2
        exit 2
    fi
    launch+=(--config_file "$configs/multi_node.json" --num_machines "$nodes" --num_processes $((gpus * nodes))
        --machine_rank "$node_rank" --main_process_ip "$main_ip" --main_process_port "$main_port")
elif [ "$gpus" -eq 1 ]; then
    launch+=(--config_file "$configs/single_gpu.json")
else
    launch+=(--config_file "$configs/multi_gpu.json" --num_processes "$gpus")
fi
# shellcheck disable=SC2206 # ACCELERATE_ARGS is meant to be split into words
launch+=(${ACCELERATE_ARGS:-} -m mora_train "$@")

if [ "$print_only" -eq 1 ]; then
    printf '%q ' "${launch[@]}"
    echo
    exit 0
fi
exec "${launch[@]}"
