"""Suite-wide settings: under pytest-xdist (``-n auto`` in pyproject's addopts: one worker per core) each worker
computes with one thread, so that the workers share the machine's cores instead of oversubscribing them."""

from __future__ import annotations

import os

if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"  # for the processes a test spawns (torchrun, the CLI in a subprocess)
    import torch

    torch.set_num_threads(1)


def pytest_sessionstart(session) -> None:
    """Stop at once, naming the folder, when the team's shared folder (``../shared``: the SmolLM2 config and
    tokenizer, the preference data) is not beside the repository: without it about 80 tests would each fail with
    transformers reading the missing path as a Hub repository id."""
    from paths import require_shared

    require_shared()
