"""Where the tests find the team's shared folder: ``shared/`` beside the repository (``../shared`` from its root),
as on every developer machine and in CI, wherever the clone lives."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the repository
SHARED = ROOT.parent / "shared"
TOKENIZER_DIR = SHARED / "bench" / "smollm2-135m-config"  # SmolLM2-135M's config and tokenizer (no weights)
HH_PATH = SHARED / "data" / "hh-harmless-base-1812.jsonl.gz"  # 1,812 Anthropic HH harmless-base pairs
