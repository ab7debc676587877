"""Where the tests find the team's shared folder: ``shared/`` beside the repository (``../shared`` from its root),
as on every developer machine and in CI, wherever the clone lives."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the repository
SHARED = ROOT.parent / "shared"
TOKENIZER_DIR = SHARED / "bench" / "smollm2-135m-config"  # SmolLM2-135M's config and tokenizer (no weights)
HH_PATH = SHARED / "data" / "hh-harmless-base-1812.jsonl.gz"  # 1,812 Anthropic HH harmless-base pairs


def require_shared() -> None:
    """Raise pytest's UsageError, naming the folder, when the shared folder's SmolLM2 config is not there (the
    suite's start-up check, `conftest.pytest_sessionstart`)."""
    import pytest

    if not TOKENIZER_DIR.is_dir():
        raise pytest.UsageError(f"the tests need the team's shared folder beside the repository: {TOKENIZER_DIR} "
                                f"is missing (clone the repository next to {SHARED.name}/, as in CI)")
