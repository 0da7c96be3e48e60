#!/usr/bin/env bash
# Issue 14's figures on a lent many-core x86 machine (no internet, no W&B needed), in one go:
#
#   bench/run_16_cores.sh FASHION_MNIST_DIR [OUT_DIR]      # OUT_DIR defaults to bench/results/16core
#
# * the quickstart, 3 seeds x {temperate, no_kd, kd_fixed_t4}, each run in its own process
#   pinned to 2 physical cores (2 torch threads, CPU even where CUDA is present), JSONL logs;
# * meanwhile, on 2 cores of their own: the QAT step ratios (bench/qat_step.py, 1 thread)
#   and the ResNet-50 plan time (bench/plan_time.py), one after the other.
# Each writes its JSON and log under OUT_DIR, with lscpu and uptime before/after.
# About 4-6 minutes on 16 idle cores. PYTHON selects the interpreter (default: python).
set -u
data=${1:?usage: bench/run_16_cores.sh FASHION_MNIST_DIR [OUT_DIR]}
out=${2:-bench/results/16core}
py=${PYTHON:-python}
cd "$(dirname "$0")/.."
export CUDA_VISIBLE_DEVICES=""   # CPU figures: no CUDA context in any of these processes
mkdir -p "$out"
lscpu > "$out/lscpu.txt"
uptime > "$out/uptime_before.txt"
"$py" -c "import torch, brevitas, torch_pruning, onnxruntime, sys; print(sys.version.split()[0], torch.__version__, brevitas.__version__, torch_pruning.__version__, onnxruntime.__version__)" > "$out/versions.txt" 2>&1
# physical cores this process may use (one logical CPU each); the last 2 go to the step/plan timings
cores=$("$py" -c "import os, sys; sys.path.insert(0, 'bench'); import quickstart as q; print(' '.join(map(str, q._one_cpu_per_core(sorted(os.sched_getaffinity(0))))))")
read -r -a cores <<< "$cores"
n=${#cores[@]}
if (( n < 4 )); then echo "need at least 4 physical cores, have $n: ${cores[*]}" >&2; exit 2; fi
timing="${cores[n-2]},${cores[n-1]}"
qs_cores=$(IFS=,; echo "${cores[*]:0:n-2}")
parallel=$(( (n - 2) / 2 ))
(( parallel > 9 )) && parallel=9
echo "quickstart: --parallel $parallel on cores $qs_cores; step and plan timings on cores $timing" | tee "$out/layout.txt"

taskset -c "$qs_cores" "$py" bench/quickstart.py --parallel "$parallel" --cores-per-run 2 --seeds 3 \
    --loggers jsonl --data-root "$data" --runs-root /tmp/qtemperate_quickstart_16core \
    --out "$out/quickstart.json" > "$out/quickstart.log" 2>&1 &
qs=$!
QTEMPERATE_FASHION_MNIST="$data" taskset -c "${cores[n-2]}" "$py" bench/qat_step.py --rounds 30 \
    --contenders float w8a8 brevitas_w8a8 w4a4 brevitas_w4a4 w4a4_frozen torchao_qat \
    --out "$out/qat_step.json" > "$out/qat_step.log" 2>&1
echo "qat_step exit $?" >> "$out/qat_step.log"
taskset -c "${cores[n-1]}" "$py" bench/plan_time.py --rounds 3 --cli-runs 3 --out "$out/plan_time.json" \
    > "$out/plan_time.log" 2>&1
echo "plan_time exit $?" >> "$out/plan_time.log"
wait "$qs"
rc=$?
echo "quickstart exit $rc" >> "$out/quickstart.log"
uptime > "$out/uptime_after.txt"
tail -n 25 "$out/quickstart.log" "$out/qat_step.log" "$out/plan_time.log"
exit "$rc"
