#!/bin/bash
# ResNet-50 on ImageNet (configs/r50.yaml) started by torchrun: one node, or several with a rendezvous host.
#
#   configs/slurm/r50_torchrun.sh                                 # this node, 8 GPUs
#   NNODES=2 RDZV_HOST=node01 configs/slurm/r50_torchrun.sh       # the same line on node01 and on node02
#
# torchrun starts the processes and Lightning joins them: trainer.devices must equal --nproc_per_node and
# trainer.num_nodes --nnodes. With the c10d rendezvous, --max-restarts restarts the workers of all nodes when
# one of them dies (a crashed process, an out-of-memory kill); the restarted workers run the same command,
# and --ckpt_path last makes them continue from the newest checkpoint instead of starting over.
# Stopping: SIGTERM to torchrun reaches the workers, which finish the running step, write last.ckpt and exit
# (status 143); torchrun kills them 30 s after its own SIGTERM, so keep steps plus one save below that.
# A run that stops on a non-finite loss (model.nonfinite_loss: stop) stops again after each restart:
# fix the cause, then start again with the same command.
# Networking: on several nodes whose hostname resolves to 127.0.0.1, set GLOO_SOCKET_IFNAME (resnet-lit's gloo
# group for preemption signals) and NCCL_SOCKET_IFNAME to the interface the nodes talk over (e.g. eth0);
# NCCL_DEBUG=INFO logs what NCCL picked when a run hangs or is slow. Inside a SLURM allocation, start this with
# `srun --ntasks-per-node=1 --cpus-per-task=<all of the node's CPUs>` and export SRUN_CPUS_PER_TASK (Slurm >=
# 22.05), or the workers and their data loaders share one core. Details: configs/slurm/r50.sbatch.
set -euo pipefail
cd "$(dirname "$0")/../.."

NPROC=${NPROC:-8}
NNODES=${NNODES:-1}
RDZV_HOST=${RDZV_HOST:-127.0.0.1}
RDZV_PORT=${RDZV_PORT:-29500}
DATA=${DATA:-/data/imagenet}
RUN_DIR=${RUN_DIR:-runs/r50}

exec torchrun \
    --nnodes "$NNODES" --nproc_per_node "$NPROC" \
    --rdzv-backend c10d --rdzv-endpoint "$RDZV_HOST:$RDZV_PORT" --rdzv-id "r50-$NNODES" \
    --max-restarts 3 \
    -m resnet_lit fit \
    --config configs/r50.yaml \
    --trainer.devices "$NPROC" --trainer.num_nodes "$NNODES" \
    --data.init_args.root "$DATA" \
    --trainer.default_root_dir "$RUN_DIR" \
    --ckpt_path last \
    "$@"
