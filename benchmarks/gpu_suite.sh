#!/usr/bin/env bash
# The GPU benchmark of issue #6, in one command, sized for one H100 (about 6 minutes, capped at 8):
#   1. ResNet-50, 224 px, batch 256, bf16-mixed + channels_last, eager: `resnet-lit fit` and a hand-written loop
#   2. CIFAR-10 time-to-94% with configs/cifar10_resnet18.yaml on the in-memory device path
#   3. the same ResNet-50 measurement with torch.compile
#   4. ResNet-18 (CIFAR) at batch 512, loop vs fit: the framework overhead where steps are short
# Results: JSON files and summary.md in $OUT (default /tmp/resnet-lit-gpu-bench).
#
# Needs, inside the repo (both ignored by git, both named in the device tool's `carry`):
#   .data/cifar10-jpg-train.tar.gz  (or .data/cifar10/train/<class>/*.jpg already unpacked)
#   .whl/                            jsonargparse + docstring-parser + typeshed-client wheels, if the GPU
#                                    image lacks them (see docs/performance.md, "GPU benchmark")
# Run from the repo root:  bash benchmarks/gpu_suite.sh
# SMOKE=1 shrinks every step to seconds (tiny models, CPU is fine) to check the script itself.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/resnet-lit-gpu-bench}
LOGS=${LOGS:-/tmp/resnet-lit-gpu-logs}  # full logs stay on the machine; $OUT gets their tails (device tool: 8 files)
mkdir -p "$OUT" "$LOGS"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
START=$(date +%s)
stamp() { echo "=== [$(($(date +%s) - START)) s] $*"; }

stamp "environment"
if ! $PY -c "import jsonargparse, docstring_parser, typeshed_client" 2>/dev/null; then
  if [ -d .whl ]; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      && export PYTHONPATH=/tmp/site
  fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader || true
$PY - <<'PY' || exit 1
import jsonargparse, lightning, torch, torchvision
print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, lightning {lightning.__version__}, "
      f"jsonargparse {jsonargparse.__version__}, cuda {torch.version.cuda}, cudnn {torch.backends.cudnn.version()}"
      + (f", gpu {torch.cuda.get_device_name()}, bf16 {torch.cuda.is_bf16_supported()}"
         if torch.cuda.is_available() else ", no GPU"))
PY

stamp "data"
if [ ! -d .data/cifar10/train ] && [ -f .data/cifar10-jpg-train.tar.gz ]; then
  mkdir -p .data/cifar10 && tar xzf .data/cifar10-jpg-train.tar.gz -C .data/cifar10
fi
ls .data/cifar10/train 2>/dev/null | head -3

R50=(--model resnet50 --image-size 224 --batch-size 256 --precision bf16-mixed --memory-format channels_last
     --runners loop,fit --steps 30)
R18=(--model resnet18_cifar --image-size 32 --batch-size 512)
CIFAR=(--root .data/cifar10 --max-minutes 2.5)
if [ "${SMOKE:-0}" = 1 ]; then
  R50=(--model resnet20 --image-size 32 --batch-size 8 --precision bf16-mixed --runners loop,fit --steps 2)
  R18=(--model resnet20 --image-size 32 --batch-size 8)
  CIFAR=(--root "${CIFAR_ROOT:-.data/cifar10}" --max-minutes 0.5 -- --trainer.max_epochs 1
         --trainer.limit_train_batches 3 --trainer.limit_val_batches 2 --model.arch resnet20
         --data.init_args.batch_size 16)
fi

stamp "1. ResNet-50 224 bf16 channels_last, eager"
timeout 130 $PY -m resnet_lit benchmark "${R50[@]}" --warmup 10 --repeats 2 --json "$OUT/r50_eager.json" \
  > "$LOGS/r50_eager.log" 2>&1; echo "exit $?"; tail -c 3000 "$LOGS/r50_eager.log" | tr "\r" "\n" | tail -n 6

stamp "2. CIFAR-10 time-to-94%, ResNet-18 recipe, loader: device"
timeout 200 $PY benchmarks/cifar10_time_to_accuracy.py --out "$OUT" "${CIFAR[@]}" \
  > "$LOGS/cifar10_tta.log" 2>&1; echo "exit $?"; tail -c 3000 "$LOGS/cifar10_tta.log" | tr "\r" "\n" | tail -n 3

stamp "3. ResNet-50 224 bf16 channels_last, torch.compile"
timeout 170 $PY -m resnet_lit benchmark "${R50[@]}" --compile true --warmup 12 --repeats 1 \
  --json "$OUT/r50_compiled.json" > "$LOGS/r50_compiled.log" 2>&1; echo "exit $?"; tail -c 3000 "$LOGS/r50_compiled.log" | tr "\r" "\n" | tail -n 6

stamp "4. ResNet-18 CIFAR 32 px batch 512 bf16: framework overhead with short steps"
timeout 60 $PY -m resnet_lit benchmark "${R18[@]}" \
  --precision bf16-mixed --runners loop,fit --warmup 10 --steps 40 --repeats 2 --json "$OUT/r18_cifar.json" \
  > "$LOGS/r18_cifar.log" 2>&1; echo "exit $?"; tail -c 3000 "$LOGS/r18_cifar.log" | tr "\r" "\n" | tail -n 6

for log in "$LOGS"/*.log; do echo "### $log"; tail -c 8000 "$log" | tr "\r" "\n" | tail -n 40; done > "$OUT/log_tails.txt"
stamp "summary"
$PY benchmarks/summarize.py "$OUT" | tee "$OUT/summary.md"
stamp "done"
