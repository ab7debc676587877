"""The one entry point: ``rlhfkit <command> [flags]``.

Commands (each module exposes ``CONFIG`` — its dataclass config — and ``run(cfg)``):

    rlhfkit rm train   train a reward model on preference (or pointwise) data
    rlhfkit rm eval    pairwise accuracy, margin and calibration of a reward model
    rlhfkit score      batched reward-model scores for prompt/response rows
    rlhfkit ppo        PPO fine-tuning of a policy against frozen reward model(s)
    rlhfkit quickstart the whole pipeline on SmolLM2-135M with a simulated human labeler
    rlhfkit report DIR regenerate plots and summary of a quickstart run folder

User errors (bad data, bad config, missing files) print one line without a traceback and exit with status 2.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Sequence

from rlhfkit.errors import RlhfkitError

COMMANDS: dict[str, str] = {
    "rm train": "rlhfkit.train.reward_trainer",
    "rm eval": "rlhfkit.train.rm_eval",
    "score": "rlhfkit.train.score",
    "ppo": "rlhfkit.train.ppo_trainer",
    "quickstart": "rlhfkit.quickstart.pipeline",
}

USAGE = """usage: rlhfkit <command> [flags]   (rlhfkit <command> --help for the flags of one command)

commands:
  rm train     train a reward model on preference or pointwise data
  rm eval      evaluate a reward model: pairwise accuracy, mean margin, calibration
  score        score prompt/response rows with a reward model (JSONL out)
  ppo          fine-tune a policy with PPO against frozen reward model(s)
  quickstart   run the whole RLHF pipeline offline on SmolLM2-135M (simulated human labeler)
  report DIR   regenerate the plots and summary of a quickstart run folder
"""


def _split_command(argv: list[str]) -> tuple[str, list[str]]:
    if not argv or argv[0] in ("-h", "--help"):
        return "", argv
    if argv[0] == "rm":
        if len(argv) < 2 or argv[1] not in ("train", "eval"):
            raise RlhfkitError("usage: rlhfkit rm {train,eval} [flags]")
        return f"rm {argv[1]}", argv[2:]
    return argv[0], argv[1:]


def _report(argv: list[str]) -> None:
    from rlhfkit.config import RaisingParser

    p = RaisingParser(prog="rlhfkit report", description="Regenerate plots and summary of a run folder")
    p.usage_in_errors = True
    p.add_argument("run_dir")
    a = p.parse_args(argv)
    from rlhfkit.quickstart.report import regenerate

    for path in regenerate(a.run_dir):
        print(path)


def _quiet_libraries() -> None:
    """Keep the terminal for rlhfkit's own progress bars and messages: no per-load reports from transformers."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - transformers is a hard dependency
        pass


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _quiet_libraries()
    from rlhfkit.utils import reuse_freed_memory

    reuse_freed_memory()  # large tensors reuse freed memory (its docstring: RLHFKIT_MALLOC=default turns it off)
    succeeded = False
    try:
        command, rest = _split_command(argv)
        if command == "":
            print(USAGE)
            return 0 if argv else 2
        if command == "report":
            _report(rest)
            return 0
        if command not in COMMANDS:
            raise RlhfkitError(f"unknown command {command!r}\n{USAGE}")
        module = importlib.import_module(COMMANDS[command])
        from rlhfkit.config import parse_config

        cfg = parse_config(module.CONFIG, rest, prog=f"rlhfkit {command}")
        module.run(cfg)
        succeeded = True
        return 0
    except RlhfkitError as e:
        print(f"rlhfkit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rlhfkit: interrupted", file=sys.stderr)
        return 130
    finally:
        from rlhfkit.train.engine.processes import close_process_group

        close_process_group(synchronize=succeeded)


if __name__ == "__main__":
    sys.exit(main())
