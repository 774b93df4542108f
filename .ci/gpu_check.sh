#!/usr/bin/env bash
# One-shot check of the CUDA path on a lent GPU machine (the `device` tool; CI never runs this).
# The machine has PyTorch but none of our other packages: the wheels travel in .whl/ (simulation/README.md, "On a
# GPU"), the paper cohort's prepared caches in data/synthetic-paper/caches. Figures land in $OUT.
# Make .whl/ here first (versions as in .ci/constraints.txt; the GPU image has Python 3.12 and torch):
#   for p in monai opacus opt_einsum flwr cryptography cffi pycparser pycryptodome iterators \
#            grpcio-health-checking protobuf grpcio pydicom nibabel tomli-w; do
#     v=$(grep -i "^${p//-/[-_]}==" .ci/constraints.txt); python3 -m pip download -q --no-deps --only-binary=:all: \
#       --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
#       -d .whl "$v"; done
#   1. device selection + AMP training throughput on the GPU (bench train), DP-SGD vs no DP (bench dp);
#   2. DP-SGD (both grad-sample modes) vs no DP on 2 pinned CPU cores (the issue's 2-core target);
#   3. the paper study at dp-epsilon 0 / 1 / 3 / 8 on the GPU (bench dp --part auc), 4 at once.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-check}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 FLWR_HOME=/tmp/flwr
bench=(python3 -c "import argparse,sys,importlib; m=importlib.import_module('simulation.bench_'+sys.argv[1]); p=argparse.ArgumentParser(); m.configure(p); sys.exit(m.run(p.parse_args(sys.argv[2:])))")
nvidia-smi -L; nproc
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0), 'bf16:', torch.cuda.is_bf16_supported())"
echo "== 1. GPU: bench train (AMP), bench dp throughput"
timeout 90 "${bench[@]}" train --device cuda --runs 3 2>&1 | tee "$OUT/train-cuda.log" | grep -v Warn
timeout 90 "${bench[@]}" dp --part throughput --device cuda --runs 3 2>&1 | tee "$OUT/dp-cuda.log" | grep -v Warn
echo "== 3. paper study at several epsilons on the GPU (background, cores 4-15)"
for e in 0 1 3 8; do
  taskset -c 4-15 timeout 280 "${bench[@]}" dp --part auc --epsilons $e --device cuda --threads 3 --out "$OUT/auc-$e.json" > "$OUT/auc-$e.log" 2>&1 &
done
echo "== 2. CPU, 2 pinned cores: bench dp throughput, grad-sample modes"
OMP_NUM_THREADS=2 taskset -c 0,1 timeout 150 "${bench[@]}" dp --part throughput --device cpu --threads 2 --runs 5 2>&1 | tee "$OUT/dp-cpu2.log" | grep -v Warn
wait
for e in 0 1 3 8; do echo "-- epsilon $e"; grep -v -E "Warn|loss.backward|INFO" "$OUT/auc-$e.log" | tail -9; done
