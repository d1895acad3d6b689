#!/usr/bin/env bash
# The GPU benchmark of issue #6 in one command, sized for one H100/H200 and a device loan of about 10 minutes.
# Every step runs under `timeout` with its share of the budget below (480 s, 8 minutes, in all), in this order:
#   environment   Python packages, CUDA, and what torch.compile needs (a C compiler, Python.h, Triton)
#   data          unpack the CIFAR-10 JPEGs
#   r50_eager     ResNet-50, 224 px, batch 256, bf16-mixed + channels_last, eager: `resnet-lit fit` and a loop
#   r18_overhead  ResNet-18 (CIFAR) at batch 512, loop vs fit: the framework overhead where steps are short
#   speedrun      configs/cifar10_speedrun.yaml (issue 16): CIFAR-10 40k/10k held out, runs of 16, 12, 20, 8 epochs
#                 (as many as fit), each timed apart from its compile time and scored once with flip TTA
#   r50_compiled  the ResNet-50 measurement with torch.compile
#   summary       summary.md from the JSON files
# Results in $OUT (default /tmp/resnet-lit-gpu-bench), each written as soon as it is measured, so a step that
# runs out of time keeps what it finished: suite.json (every step: budget, seconds, exit status, or why it was
# skipped; rewritten after every step), environment.json, r50_eager.json, r18_cifar.json, r50_compiled.json and
# cifar10_speedrun.json (rewritten after every run), log_tails.txt, summary.md.
#
# Environment: no CUDA device or a missing package stops the suite within seconds, before any measurement, with
# the problem on one line (exit status 2). Without a C compiler, Python.h or Triton only the compile step is
# skipped (the eager measurements need none of them), and the reason is printed and kept in suite.json.
# Exit status otherwise: 0 when every step ran to its end, 1 when one failed, ran out of time or was skipped.
#
# Needs, inside the repo (both ignored by git, both named in the device tool's `carry`):
#   .data/cifar10-jpg-train.tar.gz  (or .data/cifar10/train/<class>/*.jpg already unpacked; else the
#                                    speedrun step is skipped)
#   .whl/                            jsonargparse + docstring-parser + typeshed-client wheels, if the GPU
#                                    image lacks them (see docs/performance.md, "GPU benchmark")
# Run from the repo root:  bash benchmarks/gpu_suite.sh   (device tool: timeout_s 540 leaves room for the start)
# SMOKE=1 shrinks every step to seconds to check the script itself: tiny models, CPU is fine (no CUDA needed),
# torch.compile off (TORCHDYNAMO_DISABLE=1: the compile step checks its plumbing, tests/test_compile.py checks
# compilation; the speedrun step runs with model.compile false), CIFAR-10 JPEGs from $CIFAR_ROOT (one per class
# held out). tests/test_gpu_suite.py runs it.
set -uo pipefail
cd "$(dirname "$0")/.."

# Wall-clock seconds per step (H100/H200 estimates in the comments). A step gets SIGTERM GRACE seconds before
# its share ends (`resnet-lit fit` then stops at the next step) and SIGKILL at its end.
BUDGET="
environment    25   # wheels if needed, imports, nvidia-smi, a C compile of Python.h: 5-10 s
data           25   # untar 50,000 JPEGs: 5-10 s
r50_eager     100   # 2 repeats x (loop + fit): data, cuDNN autotuning, 6 + 20 steps each; about 70 s
r18_overhead   45   # 2 repeats x (loop + fit), 10 + 40 steps of batch 512; about 30 s
speedrun      150   # per run: start + decoding 40k JPEGs ~10 s, compile (cold ~40 s, then cached), ~10 s training
r50_compiled  125   # fit (cold Inductor compile, 40-80 s) then loop (cached), 4 + 20 steps each
summary        10   # summary.md
"
TOTAL_LIMIT=480
GRACE=5
SPEEDRUN_EPOCHS=${SPEEDRUN_EPOCHS:-16 12 20 8}  # one run each, in this order: the recipe's 16 first
SPEEDRUN_DEADLINE=130  # no run starts that would end later (speedrun's 150 s less GRACE, imports, margin)

OUT=${OUT:-/tmp/resnet-lit-gpu-bench}
LOGS=${LOGS:-/tmp/resnet-lit-gpu-logs}  # full logs stay on the machine; $OUT gets their tails (device tool: 8 files)
SMOKE=${SMOKE:-0}
CIFAR_ROOT=${CIFAR_ROOT:-.data/cifar10}
SITE=/tmp/resnet-lit-site  # wheels from .whl/ are installed here when the image lacks them
PY=${PYTHON:-python3}
mkdir -p "$OUT" "$LOGS"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"
START=$(date +%s)
STATUS=0
RECORDS=()

stamp() { echo "=== [$(($(date +%s) - START)) s] $*"; }
share_of() { awk -v step="$1" '$1 == step { print $2 }' <<<"$BUDGET"; }
budget_total() { awk 'NF >= 2 && $1 !~ /^#/ { total += $2 } END { print total + 0 }' <<<"$BUDGET"; }

record() {  # record STEP SECONDS EXIT SKIPPED: one entry of suite.json, which is rewritten at once
  RECORDS+=("{\"step\": \"$1\", \"budget_s\": $(share_of "$1"), \"seconds\": $2, \"exit\": $3, \"skipped\": $4}")
  local IFS=,
  printf '{"smoke": %s, "budget_total_s": %s, "limit_s": %s, "steps": [%s]}\n' \
    "$([ "$SMOKE" = 1 ] && echo true || echo false)" "$(budget_total)" "$TOTAL_LIMIT" "${RECORDS[*]}" \
    > "$OUT/suite.json.tmp" && mv "$OUT/suite.json.tmp" "$OUT/suite.json"
}

run_step() {  # run_step STEP COMMAND...: COMMAND under timeout with STEP's share; output in $LOGS/STEP.log
  local step=$1 share begin code
  shift
  share=$(share_of "$step")
  stamp "$step (budget $share s)"
  begin=$(date +%s)
  timeout -k "$GRACE" "$((share - GRACE))" "$@" > "$LOGS/$step.log" 2>&1
  code=$?
  record "$step" "$(($(date +%s) - begin))" "$code" null
  if [ "$code" = 124 ] || [ "$code" = 137 ]; then echo "exit $code: ran out of its $share s"; else echo "exit $code"; fi
  tail -c 3000 "$LOGS/$step.log" | tr "\r" "\n" | grep -v '^\s*$' | tail -n "${TAIL:-6}"
  [ "$code" = 0 ] || STATUS=1
  return "$code"
}

skip() {  # skip STEP REASON
  stamp "$1 skipped: $2"
  record "$1" 0 null "\"$2\""
  STATUS=1
}

if [ "$(budget_total)" -gt "$TOTAL_LIMIT" ]; then
  echo "gpu_suite: error: the step budget sums to $(budget_total) s, more than $TOTAL_LIMIT s" >&2
  exit 2
fi

R50=(--model resnet50 --image-size 224 --batch-size 256 --precision bf16-mixed --memory-format channels_last)
R50_EAGER=(--runners loop,fit --warmup 6 --steps 20 --repeats 2)
R50_COMPILED=(--compile true --runners fit,loop --warmup 4 --steps 20 --repeats 1)  # fit first: it matters most
R18=(--model resnet18_cifar --image-size 32 --batch-size 512 --precision bf16-mixed --runners loop,fit
     --warmup 10 --steps 40 --repeats 2)
# shellcheck disable=SC2206  # the epochs list splits on spaces
SPEEDRUN=(--source "$CIFAR_ROOT" --root .data/cifar10-speedrun --epochs $SPEEDRUN_EPOCHS
          --deadline-seconds "$SPEEDRUN_DEADLINE" --json "$OUT/cifar10_speedrun.json")
ENV_CHECK=()
COMPILE_ENV=()
if [ "$SMOKE" = 1 ]; then
  R50=(--model resnet20 --image-size 8 --batch-size 4 --precision bf16-mixed --memory-format channels_last)
  R50_EAGER=(--runners loop,fit --warmup 1 --steps 2 --repeats 1)
  R50_COMPILED=(--compile true --runners fit,loop --warmup 1 --steps 2 --repeats 1)
  R18=(--model resnet20 --image-size 8 --batch-size 4 --runners loop,fit --warmup 1 --steps 2 --repeats 1)
  SPEEDRUN=(--source "$CIFAR_ROOT" --root "${TMPDIR:-/tmp}/resnet-lit-speedrun-smoke" --held-out 1 --epochs 1
            --first-steps 1 --json "$OUT/cifar10_speedrun.json" -- --model.compile false
            --data.init_args.batch_size 8 --data.init_args.num_workers 0 --trainer.limit_train_batches 2)
  ENV_CHECK=(--cpu-ok)
  COMPILE_ENV=(TORCHDYNAMO_DISABLE=1)
fi

# shellcheck disable=SC2016  # expanded by the inner bash
TAIL=20 run_step environment bash -c '
  PY=$1; shift
  if ! "$PY" -c "import jsonargparse, docstring_parser, typeshed_client" 2>/dev/null && [ -d .whl ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "'"$SITE"'" \
      .whl/*.whl || exit 2
  fi
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader 2>/dev/null
  exec "$PY" benchmarks/check_environment.py "$@"' _ "$PY" --json "$OUT/environment.json" "${ENV_CHECK[@]}"
case $? in
  0) COMPILE_PROBLEM="" ;;
  3) COMPILE_PROBLEM="torch.compile cannot build kernels here (see environment.json)" ;;
  *) echo "gpu_suite: error: the environment cannot run the benchmark (above; full log $LOGS/environment.log)" >&2
     exit 2 ;;
esac

# shellcheck disable=SC2016
run_step data bash -c '
  root=$1
  if [ ! -d "$root/train" ] && [ -f .data/cifar10-jpg-train.tar.gz ]; then
    mkdir -p "$root" && tar xzf .data/cifar10-jpg-train.tar.gz -C "$root" || exit 1
  fi
  [ -d "$root/train" ] || { echo "no CIFAR-10 JPEGs in $root/train"; exit 1; }
  ls "$root/train" | head -3' _ "$CIFAR_ROOT"

run_step r50_eager $PY -m resnet_lit benchmark "${R50[@]}" "${R50_EAGER[@]}" --json "$OUT/r50_eager.json"

run_step r18_overhead $PY -m resnet_lit benchmark "${R18[@]}" --json "$OUT/r18_cifar.json"

if [ -d "$CIFAR_ROOT/train" ]; then
  TAIL=5 run_step speedrun $PY benchmarks/cifar10_speedrun.py run "${SPEEDRUN[@]}"
else
  skip speedrun "no CIFAR-10 JPEGs in $CIFAR_ROOT/train: carry .data/cifar10-jpg-train.tar.gz"
fi

if [ -z "$COMPILE_PROBLEM" ]; then
  run_step r50_compiled env "${COMPILE_ENV[@]}" $PY -m resnet_lit benchmark "${R50[@]}" "${R50_COMPILED[@]}" \
    --json "$OUT/r50_compiled.json"
else
  skip r50_compiled "$COMPILE_PROBLEM"
fi

# shellcheck disable=SC2016
TAIL=0 run_step summary bash -c '
  PY=$1 OUT=$2 LOGS=$3
  for log in "$LOGS"/*.log; do
    [ "$log" = "$LOGS/summary.log" ] || { echo "### $log"; tail -c 8000 "$log" | tr "\r" "\n" | tail -n 40; }
  done > "$OUT/log_tails.txt"
  "$PY" benchmarks/summarize.py "$OUT" > "$OUT/summary.md"' _ "$PY" "$OUT" "$LOGS"
cat "$OUT/summary.md" 2>/dev/null
stamp "done (budget $(budget_total) s)"
exit "$STATUS"
