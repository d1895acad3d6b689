#!/usr/bin/env bash
# The CPU measurements of docs/performance.md, one `resnet-lit benchmark` call per table. Each call interleaves
# its runs (A B A B ...) and reports medians, so the ratios hold on a machine shared with other work.
# Results: JSON in ${OUT:-.data/bench} (ignored by git). About 15-25 minutes on 2 cores; run one section with
#   bash benchmarks/cpu_suite.sh overhead|formats|pipeline|compile
# The pipeline section needs the CIFAR-10 JPEGs: mkdir -p .data/cifar10 && tar xzf cifar10-jpg-train.tar.gz -C .data/cifar10
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-.data/bench}
mkdir -p "$OUT"
BENCH=(python -m resnet_lit benchmark)
section=${1:-all}
run() { echo "+ ${BENCH[*]} $*" >&2; "${BENCH[@]}" "$@" > "$OUT/last_stdout.txt"; tail -n 8 "$OUT/last_stdout.txt"; }

if [[ $section == all || $section == overhead ]]; then
  # Framework overhead: resnet-lit fit (defaults, synthetic data in memory) vs the hand-written loop.
  run --model resnet20 --image-size 32 --batch-size 128 --runners loop,fit --repeats 7 --warmup 5 --steps 15 \
    --json "$OUT/overhead_r20.json"
  run --model resnet50 --image-size 64 --batch-size 32 --runners loop,fit --repeats 5 --warmup 3 --steps 6 \
    --json "$OUT/overhead_r50.json"
fi
if [[ $section == all || $section == formats ]]; then
  # CPU fast path: channels_last and bf16-mixed against NCHW fp32 (hand-written loop and fit).
  run --model resnet20 --image-size 32 --batch-size 128 --precision 32-true,bf16-mixed \
    --memory-format contiguous,channels_last --runners loop --repeats 3 --warmup 3 --steps 10 \
    --json "$OUT/formats_r20.json"
  run --model resnet50 --image-size 64 --batch-size 32 --precision 32-true,bf16-mixed \
    --memory-format contiguous,channels_last --runners loop --repeats 3 --warmup 2 --steps 5 \
    --json "$OUT/formats_r50.json"
fi
if [[ $section == all || $section == pipeline ]]; then
  # Input pipeline: decode + CIFAR augmentation + collate of the CIFAR-10 JPEGs, by DataLoader workers, and the
  # in-memory device path (decoded once, then crop/flip/normalise per batch).
  run --data .data/cifar10 --image-size 32 --batch-size 128 --runners pipeline --loader dataloader,device \
    --num-workers 0,1,2 --repeats 3 --warmup 5 --steps 30 --json "$OUT/pipeline_cifar10.json"
fi
if [[ $section == all || $section == compile ]]; then
  # torch.compile (inductor) against eager; the warm-up steps include the compilation.
  run --model resnet20 --image-size 32 --batch-size 128 --compile false,true --runners loop --repeats 3 \
    --warmup 3 --steps 10 --json "$OUT/compile_r20.json"
fi
