#!/usr/bin/env bash
# Run benchmark commands in parallel, one per GPU (round-robin when there are more commands than GPUs;
# SUITE_PER_GPU=N runs N at a time on each GPU, for jobs that mostly compile and plan on the CPU and time
# their steps under benchmarks/_common.py's exclusive_gpu_timing lock), collect every results file and log
# under $OUT/results.tgz, and print each log's tail.
#   benchmarks/gpu_suite.sh "python3 benchmarks/bench_nf4.py" "python3 benchmarks/bench_attention.py" ...
set -u
out=${OUT:-/tmp/memgraph-suite}
mkdir -p "$out/r"
gpus=$(nvidia-smi -L | wc -l)
slots=$((gpus * ${SUITE_PER_GPU:-1}))
limit=${SUITE_LIMIT_S:-560}
i=0
for command in "$@"; do
  gpu=$((i % gpus))
  (
    CUDA_VISIBLE_DEVICES=$gpu OUT="$out/r" PYTHONUNBUFFERED=1 timeout "$limit" bash -c "$command" \
      >"$out/r/log_$i.txt" 2>&1
    echo "[exit $?] $command" >>"$out/r/log_$i.txt"
  ) &
  i=$((i + 1))
  if ((i % slots == 0)); then wait; fi
done
wait
tar czf "$out/results.tgz" -C "$out" r
for log in "$out"/r/log_*.txt; do echo "=== $log"; tail -n "${SUITE_TAIL:-25}" "$log"; done
