#!/usr/bin/env bash
# The CUDA-only checks, for a machine with a GPU (CI has none): the `gpu` tests (tests/train/test_gpu.py: PPO with and
# without bf16, packing, rm train/eval, the sampler; 2-process PPO with 2+ GPUs), then the generation benchmark's
# small run on the GPU. Run from the repository root with the project installed (README's test command).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU'; print(torch.cuda.get_device_name(0), torch.__version__)"
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv || true
"$PY" -m pytest -m gpu -p no:cacheprovider tests/train/test_gpu.py -rs
"$PY" benchmarks/bench_generate.py --batch 16 --max-new-tokens 32 || echo "bench_generate failed (see above)"
