#!/usr/bin/env bash
# Every GPU check and benchmark in one call of a lent GPU machine (device time is scarce):
#   bash benchmarks/gpu_session.sh [tests|dequant|marlin|inference|convert|parallel|gptq|gguf ...]   (default: all but gguf)
# Logs go to /tmp/ctformat-gpu as <step>.log and <step>.json; with $OUT set (the device tool's
# folder, which brings back at most 8 files) they come back packed as $OUT/gpu-logs.tgz. Expects, where the
# machine lacks them, wheels in .whl/ (compressed-tensors and its needs) and the real
# llm-compressor checkpoints in .devshared/real-checkpoints (linked as ../shared).
set -uo pipefail
cd "$(dirname "$0")/.."
out=/tmp/ctformat-gpu
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
mkdir -p /tmp/site && ln -sfn "$PWD/cli" /tmp/site/ctformat_cli     # the CLI's installed import name
export PYTHONPATH=$PYTHONPATH:/tmp/site
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
[ -d .devshared ] && [ ! -e ../shared ] && ln -sfn "$PWD/.devshared" ../shared
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv | tee "$out/device.txt"
python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)' | tee -a "$out/device.txt"
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(tests dequant formats marlin inference convert parallel gptq)
for step in "${steps[@]}"; do
  echo "=== $step $(date -u +%T)"
  case $step in
    tests) # the kernel tests compile a few hundred kernel variants: in parallel where pytest-xdist is there
           xdist=""; python3 -c "import xdist" 2>/dev/null && xdist="-n 8"
           { timeout 240 python3 -m pytest -q -p no:cacheprovider $xdist tests/test_kernels.py \
               tests/test_formats_kernels.py
             timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_gpu_inference.py \
               tests/test_marlin.py "tests/test_gptq_integration.py::test_convert_on_cuda_is_the_cpu_output"; } 2>&1 | tee "$out/tests.log" | grep -E "^(FAILED|ERROR)|[0-9]+ (passed|failed)" ;;
    formats) timeout 150 python3 benchmarks/bench_formats.py --device cuda --json "$out/formats.json" 2>&1 \
               | tee "$out/formats.log" ;;
    dequant) # self-limited: sweep ~100 s, no case started after 240 s (about 4.5 minutes in all)
             timeout 400 python3 benchmarks/bench_dequant_gpu.py --sweep --sweep-s 100 --budget-s 240 \
               --json "$out/dequant.json" > "$out/dequant.log" 2>&1
             grep -v "^  sweep" "$out/dequant.log" ;;
    marlin) timeout 150 python3 benchmarks/bench_marlin.py --json "$out/marlin.json" 2>&1 | tee "$out/marlin.log" ;;
    inference) timeout 150 python3 benchmarks/bench_inference.py --json "$out/inference.json" 2>&1 | tee "$out/inference.log" ;;
    gptq) timeout 300 python3 benchmarks/bench_gptq.py --device cuda --json "$out/gptq.json" 2>&1 | tee "$out/gptq.log" ;;
    gguf) # CPU only: the GGUF repack and convert --to gguf against a plain copy (not in the default list)
          timeout 300 python3 benchmarks/bench_gguf.py --json "$out/gguf.json" 2>&1 | tee "$out/gguf.log" ;;
    convert) timeout 200 python3 benchmarks/bench_convert.py --gb 2 --device cuda --json "$out/convert.json" 2>&1 \
               | tee "$out/convert.log" ;;
    parallel) timeout 500 python3 benchmarks/bench_convert.py --gb 2 --device cuda --workers 1,2,3,4 --devices cuda:0 \
                --json "$out/parallel.json" 2>&1 | tee "$out/parallel.log" ;;
    *) echo "unknown step $step" ;;
  esac
done
if [ -n "${OUT:-}" ]; then tar czf "$OUT/gpu-logs.tgz" -C "$out" .; fi
