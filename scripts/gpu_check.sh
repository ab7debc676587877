#!/usr/bin/env bash
# The CUDA-only checks, for a machine with a GPU (CI has none): the `gpu` tests (tests/train/test_gpu.py: PPO with and
# without bf16, packing, rm train/eval, the sampler; 2-process PPO with 2+ GPUs), then three benchmarks on the GPU,
# each side by side in one run: generation (ours vs HF generate, fp32, a random-init SmolLM2-135M unless GEN_MODEL
# names a model folder), the PPO anchor (bf16: TRL's anchor runs bf16 on CUDA) and RM training (bf16, one micro-batch
# per step as TRL: per-pair micro-batches are a CPU memory setting and launch-bound on a GPU).
# Run from the repository root with the project installed (README's test command), or with PY=python3 and the
# source on PYTHONPATH. RESULTS (default benchmarks/results) gets the JSON; SKIP_BENCH=1 runs the tests alone.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
RESULTS=${RESULTS:-benchmarks/results}
status=0
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU'; print(torch.cuda.get_device_name(0), torch.__version__)" || exit 1
nvidia-smi --query-gpu=name,memory.total,memory.used,clocks.sm --format=csv || true
timeout "${TEST_TIMEOUT:-600}" "$PY" -m pytest -m gpu -p no:cacheprovider -n 0 -s -rs tests/train/test_gpu.py || status=1
[ "${SKIP_BENCH:-0}" = 1 ] && exit $status
model=${GEN_MODEL:-}
if [ -z "$model" ]; then
  model=$(mktemp -d)/smollm2-135m-random
  "$PY" -c "import sys; sys.path.insert(0, 'benchmarks'); import _common as C; C.save_random_causal_lm(C.DEFAULT_CONFIG_DIR, '$model', tiny=False)" || status=1
fi
timeout "${BENCH_TIMEOUT:-900}" "$PY" benchmarks/bench_generate.py --device cuda --model "$model" --batch 64 \
  --max-new-tokens 128 --repeats 2 --out "$RESULTS" || { echo "bench_generate failed"; status=1; }
timeout "${BENCH_TIMEOUT:-900}" "$PY" benchmarks/bench_ppo.py --workload anchor --precision bf16 --out "$RESULTS" \
  || { echo "bench_ppo failed"; status=1; }
timeout "${BENCH_TIMEOUT:-900}" "$PY" benchmarks/bench_rm.py --precision bf16 --micro-batch 0 --out "$RESULTS" \
  || { echo "bench_rm failed"; status=1; }
exit $status
