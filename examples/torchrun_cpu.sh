#!/usr/bin/env bash
# Two-process DDP on CPU, started by torchrun: the launch a multi-GPU node uses, runnable on a laptop.
#
#   examples/torchrun_cpu.sh                            # quickstart (digits, ResNet-20), 2 processes
#   NPROC=4 examples/torchrun_cpu.sh                    # 4 processes
#   examples/torchrun_cpu.sh --trainer.max_epochs 1     # further arguments go to `resnet-lit fit`
#
# torchrun starts the processes and Lightning joins them, so trainer.devices must equal --nproc_per_node
# (on CPU `devices: auto` means 1). The per-process batch is the quickstart's 64 divided by NPROC, so the
# global batch, and with it the recipe, stays the same. --standalone picks a free local rendezvous port.
# Ctrl-C: torchrun passes the SIGINT on to both processes, which save runs/quickstart_torchrun/checkpoints/last.ckpt
# at the next step and exit 130 (torchrun then reports the signal itself); add --ckpt_path last to continue.
# On GPU nodes the same line with the r50 recipe is:
#   torchrun --standalone --nproc_per_node 8 -m resnet_lit fit --config configs/r50.yaml --trainer.devices 8
set -euo pipefail
cd "$(dirname "$0")/.."

NPROC=${NPROC:-2}
PYTHON=${PYTHON:-python}
exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" \
    -m resnet_lit fit --config configs/quickstart.yaml \
    --trainer.accelerator cpu --trainer.devices "$NPROC" --trainer.strategy ddp \
    --data.init_args.batch_size $((64 / NPROC)) \
    --trainer.default_root_dir runs/quickstart_torchrun \
    "$@"
