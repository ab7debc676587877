"""Suite-wide settings: under pytest-xdist (``-n auto`` in pyproject's addopts: one worker per core) each worker
computes with one thread, so that the workers share the machine's cores instead of oversubscribing them."""

from __future__ import annotations

import os

if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"  # for the processes a test spawns (torchrun, the CLI in a subprocess)
    import torch

    torch.set_num_threads(1)
