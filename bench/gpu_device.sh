#!/usr/bin/env bash
# Run ON the GPU machine (the `run` device tool), from the repository root, with .gpu/ carried
# (made here by bench/gpu_prepare.sh). bench/README.md, section GPU, says what to run and when.
#
#   bash bench/gpu_device.sh all     # CUDA-marked tests (100 s cap), then bench/gpu.py (8 min cap)
#   bash bench/gpu_device.sh bench   # bench/gpu.py only
#   bash bench/gpu_device.sh test    # CUDA-marked tests and tests/test_gpu_bench.py
#   bash bench/gpu_device.sh suite   # `make test`: the whole suite (what could not be carried fails)
#   bash bench/gpu_device.sh profile # bench/gpu_profile.py: tunekit's SFT step against the plain loop
#   SECTIONS=peft,ppo bash bench/gpu_device.sh all   # bench/gpu.py's --sections (default: all of them)
#
# Everything it writes lands in $OUT (env.txt, bench.log, gpu.json, test-*.log), which the device
# tool brings back. The machine's own python3 (torch 2.11 + CUDA 13) runs it; the wheels in .gpu/whl
# (the versions tested on the CPU) go first on PYTHONPATH.
set -uo pipefail
mode=${1:-all}
OUT=${OUT:-/tmp/tunekit-gpu-out}
SITE=${SITE:-/tmp/site}  # where the wheels are installed (first on PYTHONPATH)
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export TRANSFORMERS_VERBOSITY=error HF_DATASETS_DISABLE_PROGRESS_BARS=1

if [ ! -d .gpu/whl ]; then
    echo "no .gpu/whl: run bench/gpu_prepare.sh on the CPU machine and carry .gpu" >&2
    exit 2
fi
mkdir -p "$SITE"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    .gpu/whl/*.whl || exit 3
cp -r .gpu/site/* "$SITE"/
export PYTHONPATH=$SITE:$PWD
# tests/conftest.py fills data/ from ../shared/data, the datasets mirror beside the checkout.
if [ ! -e ../shared/data ]; then
    mkdir -p ../shared && ln -s "$PWD/.gpu/shared-data" ../shared/data
fi

{
    date -u
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
    python3 - <<'EOF'
import importlib.metadata as m, torch
print("python3", __import__("sys").version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
      "device", torch.cuda.get_device_name() if torch.cuda.is_available() else None)
for name in ("transformers", "trl", "peft", "accelerate", "datasets", "pyarrow", "bitsandbytes", "liger-kernel",
             "triton", "pydantic", "tokenizers", "huggingface-hub", "fsspec", "regex"):
    try:
        print(f"  {name} {m.version(name)}")
    except m.PackageNotFoundError:
        print(f"  {name} missing")
EOF
} 2>&1 | tee "$OUT/env.txt"

gpu_tests() {
    timeout 100 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py 2>&1 | tee "$OUT/test-gpu.log"
}
bench() {
    # Sections are budgeted inside (about 7 min in all; gpu.json is rewritten after each section);
    # the outer timeout only guards a hang, and keeps `all` inside one 10-minute call.
    timeout 480 python3 bench/gpu.py ${SECTIONS:+--sections "$SECTIONS"} --out "$OUT/gpu.json" 2>&1 | tee "$OUT/bench.log" \
        | grep -v -e "Loading weights" -e "it/s]" -e "examples/s]"
}

case "$mode" in
    all) gpu_tests; bench ;;
    bench) bench ;;
    test)
        gpu_tests
        timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_bench.py 2>&1 | tee "$OUT/test-bench.log"
        ;;
    suite)
        timeout 560 python3 -m pytest -q -p no:cacheprovider --timeout 300 tests 2>&1 \
            | tee "$OUT/test-suite.log" | tail -80
        ;;
    profile)
        timeout 240 python3 bench/gpu_profile.py 2>&1 | tee "$OUT/profile.log" | grep -v -e "Loading weights" -e "it/s]"
        ;;
    *) echo "usage: bash bench/gpu_device.sh all|bench|test|suite|profile" >&2; exit 2 ;;
esac
