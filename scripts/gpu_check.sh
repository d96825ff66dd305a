#!/usr/bin/env bash
# The GPU check: proves and measures the CUDA path in one command, on a GPU machine with this repository copied in
# and nothing installed or downloaded (python3 with torch, transformers, tiktoken, tokenizers, safetensors, pytest).
#
#     bash scripts/gpu_check.sh                 # writes under $OUT (default: gpu_check/), at most 8 files
#
# Steps run most important first, each under its own time limit and all within GPU_CHECK_BUDGET seconds (default
# 460, so the whole check ends within 8 minutes): a slow step cuts the tail, not the run. Each step's output goes
# to its own log; summary.md, written first and rewritten after every step, says what ran, how it ended, how long
# it took, and the figures that matter. Without CUDA the summary says so, nothing else runs, and the exit status
# is 0. Read summary.md, fix what failed, and commit the figures to benchmarks/results/gpu_h200.md (README,
# "Performance").
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # scripts in benchmarks/ import the packages without pip
PYTHON=${PYTHON:-python3}
OUT=${OUT:-gpu_check}
BUDGET=${GPU_CHECK_BUDGET:-460}
mkdir -p "$OUT"
summary="$OUT/summary.md"
started=$(date +%s)
rows=""
figures=""

write_summary() {
  {
    echo "# GPU check, $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo
    echo "command: \`bash scripts/gpu_check.sh\` (budget ${BUDGET} s); $device"
    echo
    echo "| step | status | seconds | log |"
    echo "| --- | --- | ---: | --- |"
    printf '%b' "$rows"
    if [ -n "$figures" ]; then
      echo
      echo "## Figures"
      printf '%b' "$figures"
    fi
  } >"$summary"
}

# step NAME LIMIT_SECONDS COMMAND...: runs COMMAND into $OUT/NAME.log for at most LIMIT (or what the budget has left).
step() {
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET - ($(date +%s) - started)))
  if [ "$left" -lt 15 ]; then
    rows+="| $name | skipped: the budget is spent | 0 | |\n"
    write_summary
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  local t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$? status
  case $rc in
    0) status="ok" ;;
    124 | 137) status="**timed out** after ${limit} s" ;;
    *) status="**failed** (exit $rc)" ;;
  esac
  rows+="| $name | $status | $(($(date +%s) - t0)) | $name.log |\n"
  write_summary
}

# figure TITLE LOG PATTERN: the log's lines matching PATTERN (an extended regex), under TITLE in the summary.
figure() {
  local lines
  lines=$(grep -E "$3" "$OUT/$2" 2>/dev/null | tail -n "${4:-12}")
  [ -n "$lines" ] && figures+="\n### $1\n\n\`\`\`\n$lines\n\`\`\`\n"
  write_summary
}

device=$($PYTHON - <<'EOF' 2>&1
import platform

import torch

if not torch.cuda.is_available():
    print(f"**no CUDA**: torch {torch.__version__} sees no GPU here, so nothing ran")
else:
    major, minor = torch.cuda.get_device_capability()
    print(f"device {torch.cuda.get_device_name()} (compute capability {major}.{minor}, "
          f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB), torch {torch.__version__}, "
          f"CUDA {torch.version.cuda}, Python {platform.python_version()}")
EOF
)
write_summary
if [[ "$device" != device* ]]; then
  echo "$device" | tail -n 1
  echo "summary: $summary"
  exit 0
fi

# 1. What only a GPU runs: FlexAttention, fused SDPA, the CUDA loss, compiled training and decode, INT8, the loader.
step tests 240 $PYTHON -m pytest -q -rA -p no:cacheprovider tests/test_cuda.py
figure "tests/test_cuda.py" tests.log '^(PASSED|FAILED|ERROR|SKIPPED)|[0-9]+ (passed|failed)' 30

# 2. The real run: the default 270M config and micro-batch (32 x 128) in bf16, compiled, 30 iterations of 8
#    micro-batches on the offline pydocs corpus.
run_dir=$(mktemp -d)
TORCH_LOGS="graph_breaks,recompiles" step train 120 $PYTHON train.py --dataset=pydocs --compile=true \
  --gradient_accumulation_steps=8 --max_iters=30 --warmup_steps=10 --eval_interval=30 --eval_iters=10 --log_interval=5 --out_dir="$run_dir/run"
cp "$run_dir/run/metrics.jsonl" "$OUT/train_metrics.jsonl" 2>/dev/null
breaks=$(grep -ci "graph break" "$OUT/train.log")
recompiles=$(grep -ci "recompil" "$OUT/train.log")
figures+="\ntrain.py: $breaks log lines about graph breaks, $recompiles about recompilations (TORCH_LOGS)\n"
figure "train.py" train.log '^(iter|eval|torch.compile|note|error)|parameters,' 12

# 3. Training speed side by side with transformers, both eager (train.py above measured compiled): the seed's
#    32 x 128, then 2 x 8192 (FlexAttention); then ours at 32 x 128 with Muon (bf16 Newton-Schulz on this GPU), whose
#    tok/s against the AdamW row above is Muon's cost per step. One log: only 8 files come back from the machine.
step bench_train 110 bash -c "$PYTHON benchmarks/bench_train.py --block-size 128 8192 --rounds 1 --steps 5 && \
  echo 'optimizer: muon' && $PYTHON benchmarks/bench_train.py --implementations ours --block-size 128 --rounds 1 \
  --steps 5 --optimizer muon"
figure "bench_train.py (AdamW, then ours with Muon)" bench_train.log 'tok/s|ratio|block|peak|optimizer' 16

# 4. Decoding per weight format, eager and compiled.
step bench_generate 60 $PYTHON benchmarks/bench_generate.py --device cuda --skip-recompute --new-tokens 256
figure "bench_generate.py" bench_generate.log 'tok/s|bandwidth|speedup' 16

# 5. As time allows: compiled decoding through sample.py on the run's checkpoint, then the attention benchmark.
step sample 40 $PYTHON sample.py --ckpt "$run_dir/run" --compile --max-new-tokens 200 --temperature 0 \
  --prompt "def main():"
figure "sample.py --compile" sample.log 'tokens/s|compiled|error' 4
step bench_attention 45 $PYTHON benchmarks/bench_attention.py --max-T 16384
figure "bench_attention.py" bench_attention.log '[0-9]' 16

rm -rf "$run_dir"
echo "summary: $summary"
cat "$summary"
