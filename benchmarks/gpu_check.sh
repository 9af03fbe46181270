#!/usr/bin/env bash
# One prepared GPU check (the device tool runs it in the repository root; its python has torch and
# metacl's dependencies): install metacl, run the `gpu` tests, then every benchmark with
# --device cuda, writing each output to $OUT (default benchmarks/results/gpu). About 8 minutes on
# an H200; each step has its own time limit so that one hang cannot eat the budget.
set -u
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
step() {  # name, limit in seconds, command...
  local name=$1 limit=$2; shift 2
  echo "== $name ($(date +%T))" | tee -a "$OUT/summary.txt"
  ( time timeout "$limit" "$@" ) > "$OUT/$name.txt" 2>&1
  echo "   exit $? ($(tail -3 "$OUT/$name.txt" | grep real))" | tee -a "$OUT/summary.txt"
}
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
pip install -q --no-deps -e . > "$OUT/install.txt" 2>&1 || pip install -q --no-deps --no-build-isolation -e . >> "$OUT/install.txt" 2>&1
step gpu_tests 180 python -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py -o addopts="" -ra
step bench_scenes 90 python benchmarks/bench_scenes.py --images 2048
step bench_mastery 120 python benchmarks/bench_mastery.py --device cuda --batches 3 --num-images 20000 --reference-workers 0 4
step bench_meta_train_anml 120 python benchmarks/bench_meta_train.py --device cuda --episodes 50 --warmup 5 --reference-episodes 5
step bench_meta_eval 120 python benchmarks/bench_meta_eval.py --device cuda --steps 600 --reference-steps 200 --memory-gb 60
step bench_meta_train_oml 60 python benchmarks/bench_meta_train.py --device cuda --model oml --episodes 30 --warmup 3 --skip-reference
cat "$OUT/summary.txt"
