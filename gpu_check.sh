#!/usr/bin/env bash
# The first hour on a new GPU machine, in one command: the versions, the GPU test suite
# (tests/test_gpu.py), then bench.py's 124M training step in the variants that matter most.
#
#   bash gpu_check.sh            # all of it (estimated 10-15 minutes on one H100, compiles included)
#   bash gpu_check.sh tests      # the versions and the GPU tests only (estimated 5-7 minutes)
#   bash gpu_check.sh bench      # the versions and bench.py only (estimated 6-9 minutes)
#   bash gpu_check.sh prepare    # where ../shared is (a developer's machine): copy the tokenizer cache
#                                # and Tiny Shakespeare into the checkout, for an offline GPU machine
#
# The times are estimates, not yet measured: with a 10-minute limit per command, run `tests`, then `bench`.
# Offline: tiktoken reads its GPT-2 files from .tiktoken_cache/ in the checkout when that exists
# (git-ignored; `prepare` fills it), and the tests need Tiny Shakespeare as input.txt (or
# ../shared/data/input.txt). Results go to $OUT when it is set, else to log/gpu_check/:
# versions.txt, gpu_tests.txt (pytest -s: the printed peak memories), gpu_tests.xml, bench.txt.
set -uo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
RESULTS=${OUT:-log/gpu_check}
BENCH_VARIANTS=eager,compile,compile-logits,compile-B32,compile-flash,compile-vocab50257,compile-cudnn
stage=${1:-all}

case "$stage" in
all | tests | bench) ;;
prepare)
  shared=../shared
  if [ ! -d .tiktoken_cache ]; then
    src=${TIKTOKEN_CACHE_DIR:-$shared/tiktoken_cache}
    [ -d "$src" ] || { echo "error: no tiktoken cache at $src: set TIKTOKEN_CACHE_DIR to one" >&2; exit 2; }
    cp -r "$src" .tiktoken_cache
  fi
  if [ ! -f input.txt ]; then
    [ -f "$shared/data/input.txt" ] || { echo "error: no $shared/data/input.txt: run" \
      "'python train_gpt2.py --preset shakespeare' once (it downloads input.txt)" >&2; exit 2; }
    cp "$shared/data/input.txt" input.txt
  fi
  echo "ready: .tiktoken_cache/ and input.txt are in the checkout (git-ignored); carry both to the GPU machine"
  exit 0 ;;
*)
  echo "error: unknown stage '$stage': use all, tests, bench or prepare" >&2
  exit 2 ;;
esac

if [ -d .tiktoken_cache ]; then
  export TIKTOKEN_CACHE_DIR="$PWD/.tiktoken_cache"
elif [ -z "${TIKTOKEN_CACHE_DIR:-}" ]; then
  echo "warning: no .tiktoken_cache/ here and TIKTOKEN_CACHE_DIR is unset: tiktoken will try to download" >&2
fi
export HF_HUB_OFFLINE=1
if [ ! -f input.txt ] && [ ! -f ../shared/data/input.txt ]; then
  echo "error: the tests need Tiny Shakespeare as input.txt in the checkout: run 'bash gpu_check.sh prepare'" \
    "where ../shared is, and carry input.txt and .tiktoken_cache to this machine" >&2
  exit 2
fi
mkdir -p "$RESULTS"

# what this machine is: a line of versions to quote beside every number it produces
"$PYTHON" - <<'EOF' 2>&1 | tee "$RESULTS/versions.txt"
import platform, subprocess
import torch
print(f"python {platform.python_version()}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"cuDNN {torch.backends.cudnn.version()}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"GPU: {torch.cuda.device_count()} x {p.name}, {p.total_memory / 2**30:.1f} GiB, "
          f"compute capability {p.major}.{p.minor}, {p.multi_processor_count} SMs")
else:
    print("GPU: none visible to torch (torch.cuda.is_available() is False)")
try:
    import triton
    print(f"triton {triton.__version__}")
except ImportError:
    print("triton: not installed (torch.compile on CUDA needs it)")
try:
    print("driver " + subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                     capture_output=True, text=True, timeout=60).stdout.strip())
except (OSError, subprocess.TimeoutExpired):
    print("driver: nvidia-smi not found")
import os, sys
import tiktoken
try:  # fail here, not mid-test, when the cache is missing offline
    tiktoken.get_encoding("gpt2")
except Exception as e:
    sys.exit(f"error: tiktoken cannot load the GPT-2 encoding ({type(e).__name__}) from TIKTOKEN_CACHE_DIR="
             f"{os.environ.get('TIKTOKEN_CACHE_DIR')}: run 'bash gpu_check.sh prepare' where ../shared is, and carry "
             ".tiktoken_cache")
print(f"tiktoken gpt2: loaded from {os.environ.get('TIKTOKEN_CACHE_DIR')}")
EOF
[ "${PIPESTATUS[0]}" -eq 0 ] || { echo "error: the checks above failed (see $RESULTS/versions.txt)" >&2; exit 1; }

status=0
if [ "$stage" != bench ]; then
  echo "== GPU tests: $PYTHON -m pytest -m gpu tests/test_gpu.py"
  "$PYTHON" -m pytest -m gpu tests/test_gpu.py -v -s -rA --durations=0 -p no:cacheprovider \
    --junitxml="$RESULTS/gpu_tests.xml" 2>&1 | tee "$RESULTS/gpu_tests.txt"
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi
if [ "$stage" != tests ]; then
  echo "== bench: $PYTHON bench.py --device cuda --variants $BENCH_VARIANTS --warmup 2 --steps 5"
  "$PYTHON" bench.py --device cuda --variants "$BENCH_VARIANTS" --warmup 2 --steps 5 2>&1 | tee "$RESULTS/bench.txt"
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi

echo "== summary (files in $RESULTS)"
if [ "$stage" != bench ]; then
  grep -E "^124M step|[0-9]+ (passed|failed|skipped|error).* in [0-9.]+s" "$RESULTS/gpu_tests.txt" | tail -5
fi
if [ "$stage" != tests ]; then
  grep -E "^torch |^\|" "$RESULTS/bench.txt"
fi
echo "look at: syncs in step = none in every row; MFU; peak memory vs 80 GB; tokens/s vs the 550,000 goal"
exit $status
