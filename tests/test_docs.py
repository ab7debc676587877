"""The docs pages cannot drift from the code: their config tables equal the tables generated from the dataclasses,
their metric tables list exactly the metric names the trainers log (collected from tiny real runs), and their code
snippets run and give what they promise."""

from __future__ import annotations

import dataclasses
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import pytest
import torch

from rlhfkit import docgen
from rlhfkit.config import parse_config
from rlhfkit.docgen import (CONFIG_CLASSES, config_class, documented_metrics, knob_regions, knob_table, render_page,
                            update_docs)

DOCS = Path(__file__).resolve().parents[1] / "docs"
PAGES = {name: DOCS / name for name in docgen.PAGES}
FIX = "the docs are stale: run `python -m rlhfkit.docgen` to regenerate the config tables"

sys.path.insert(0, str(Path(__file__).resolve().parent / "train"))  # the trainers' test helpers


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread of the shared CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ----------------------------------------------------------------------------------------------------------
# Config tables
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("page", sorted(PAGES))
def test_every_knob_region_equals_the_generated_table(page):
    text = PAGES[page].read_text()
    regions = knob_regions(text)
    assert regions, f"{page} has no knobs region"
    for name, body in regions:
        assert body == knob_table(config_class(name)), f"{page}: table of {name} differs from the code; {FIX}"
    assert render_page(text) == text, FIX


def test_every_config_class_has_one_table_listing_every_field():
    found: dict[str, list[str]] = {}
    for page, path in PAGES.items():
        for name, body in knob_regions(path.read_text()):
            found.setdefault(name, []).append(body)
    assert sorted(found) == sorted(CONFIG_CLASSES), "each config class needs one knobs region in docs/"
    for name, bodies in found.items():
        assert len(bodies) == 1, f"{name} has {len(bodies)} tables"
        flags = {line.split(" | ")[0].split("`")[1] for line in bodies[0].splitlines()[2:]}
        fields = {f"--{f.name}" for f in dataclasses.fields(config_class(name))}
        assert flags == fields, f"{name}: fields {sorted(fields ^ flags)} missing from / extra in the docs; {FIX}"


@dataclass
class _Toy:
    """A config with one field of each kind the generator renders differently."""

    path: str = field(metadata={"help": "where | what"})
    rate: Optional[float] = field(default=None, metadata={"help": "a rate\n    over two lines"})
    mode: str = field(default="a", metadata={"help": "the mode", "choices": ["a", "b"]})
    names: list[str] = field(default_factory=list, metadata={"help": "names"})
    fast: bool = field(default=True, metadata={"help": "go fast"})
    slow: bool = field(default=False, metadata={"help": "go slow"})


def test_knob_table_renders_flags_types_defaults_and_help():
    assert knob_table(_Toy) == (
        "| flag | type | default | meaning |\n"
        "|---|---|---|---|\n"
        "| `--path` | str | required | where \\| what |\n"          # required field; pipe escaped
        "| `--rate` | float | `None` | a rate over two lines |\n"   # Optional[X] -> X; one line
        "| `--mode` | str: `a`, `b` | `a` | the mode |\n"           # choices listed with the type
        "| `--names` | list[str] | `[]` | names |\n"                # default_factory called
        "| `--fast` / `--no_fast` | bool | `True` | go fast |\n"    # True booleans get the negative flag
        "| `--slow` | bool | `False` | go slow |\n"
    )


def test_the_negative_flag_of_a_true_boolean_exists_on_the_command_line():
    from rlhfkit.train.rm_config import RMTrainConfig

    cfg = parse_config(RMTrainConfig, ["--model", "m", "--data", "d", "--output", "o", "--no_group_by_length"])
    assert cfg.group_by_length is False


def test_a_field_without_help_is_refused():
    @dataclass
    class NoHelp:
        x: int = 1

    with pytest.raises(ValueError, match="NoHelp.x has no metadata"):
        knob_table(NoHelp)


def test_update_docs_rewrites_only_stale_regions_and_check_writes_nothing(tmp_path):
    from rlhfkit.train.rm_config import ScoreConfig

    page = tmp_path / "page.md"
    stale = "intro\n<!-- knobs:ScoreConfig -->\n| old | table |\n<!-- /knobs:ScoreConfig -->\noutro\n"
    page.write_text(stale)
    assert update_docs([page], check=True) == [f"{page}: ScoreConfig"]
    assert page.read_text() == stale
    assert update_docs([page]) == [f"{page}: ScoreConfig"]
    fresh = f"intro\n<!-- knobs:ScoreConfig -->\n{knob_table(ScoreConfig)}<!-- /knobs:ScoreConfig -->\noutro\n"
    assert page.read_text() == fresh
    assert update_docs([page]) == [] and update_docs([page], check=True) == []


def test_cli_check_exits_1_on_stale_tables_and_0_after_regenerating(tmp_path, capsys):
    page = tmp_path / "page.md"
    page.write_text("<!-- knobs:RMEvalConfig -->\n<!-- /knobs:RMEvalConfig -->\n")
    assert docgen.main(["--check", str(page)]) == 1
    assert "RMEvalConfig" in capsys.readouterr().out
    assert docgen.main([str(page)]) == 0
    assert docgen.main(["--check", str(page)]) == 0


@pytest.mark.parametrize("text, needle", [
    ("<!-- knobs:ScoreConfig -->\n| x |\n", "unbalanced"),
    ("<!-- knobs:NoSuchConfig -->\n<!-- /knobs:NoSuchConfig -->\n", "unknown config class"),
])
def test_bad_markers_are_errors(tmp_path, text, needle):
    page = tmp_path / "page.md"
    page.write_text(text)
    with pytest.raises(ValueError, match=needle):
        update_docs([page])
    assert docgen.main([str(page)]) == 2


# ----------------------------------------------------------------------------------------------------------
# Metric tables
# ----------------------------------------------------------------------------------------------------------
def test_documented_metrics_reads_first_cells_inside_the_metrics_region_only():
    text = ("| `out/side` | x |\n<!-- metrics -->\n| metric | when |\n|---|---|\n| `a/b`, `c/d` | see `e/f` |\n"
            "| `g/<name>` | a family |\n<!-- /metrics -->\n")
    assert documented_metrics(text) == {"a/b", "c/d", "g/<name>"}


def test_ppo_page_documents_exactly_the_logged_metrics(tmp_path):
    import ppo_helpers

    from rlhfkit.train.ppo_trainer import PPOTrainer
    from rlhfkit.utils import read_jsonl

    cfg = ppo_helpers.make_config(tmp_path, iterations=1, ppo_epochs=1, num_minibatches=1, micro_batch_size=8,
                                  sample_table_every=0, monitor_rewards=["ppo_helpers:length_reward"])
    PPOTrainer(cfg).train()
    logged = set().union(*read_jsonl(tmp_path / "run" / "metrics.jsonl")) - {"step"}
    assert "monitor/length_reward" in logged  # a family of names, documented as monitor/<name>
    logged = {re.sub(r"^monitor/.*", "monitor/<name>", name) for name in logged}
    documented = documented_metrics(PAGES["ppo.md"].read_text())
    assert documented == logged, (f"docs/ppo.md lists {sorted(documented - logged)} that are not logged and misses "
                                  f"{sorted(logged - documented)}")


def test_reward_modeling_page_documents_exactly_the_logged_metrics(tmp_path):
    import rm_helpers

    from rlhfkit.cli import main
    from rlhfkit.train.reward_trainer import PairwiseObjective, PointwiseObjective, window_metrics
    from rlhfkit.train.rm_config import RMTrainConfig
    from rlhfkit.utils import read_jsonl

    # a real pairwise run with held-out evaluation: metrics.jsonl and eval_results.json
    sft = rm_helpers.make_sft_folder(tmp_path / "sft")
    data = rm_helpers.write_jsonl(tmp_path / "pairs.jsonl", rm_helpers.preference_rows(20))
    out = tmp_path / "rm"
    assert main(["rm", "train", "--model", str(sft), "--data", str(data), "--output", str(out), "--batch_size", "8",
                 "--micro_batch_size", "8", "--eval_fraction", "0.2", "--logging_steps", "1"]) == 0
    logged = set().union(*read_jsonl(out / "metrics.jsonl"), json.loads((out / "eval_results.json").read_text()))
    # the other objectives' statistics, named by the trainer's own code
    for extra in [dict(loss="bce"), dict(loss="ce2"), dict(loss="mse"), dict(loss="multi_objective", aspects=["a"]),
                  dict(model_kind="pairrm")]:
        cfg = RMTrainConfig(model="m", data="d", output="o", **extra)
        objective = (PairwiseObjective if cfg.pairwise else PointwiseObjective)(cfg, 0)
        for prefix in ("rm", "eval"):
            logged |= set(window_metrics(prefix, objective.names, [1.0] * (3 + len(objective.names))))
    logged -= {"step"}
    documented = documented_metrics(PAGES["reward_modeling.md"].read_text())
    assert documented == logged, (f"docs/reward_modeling.md lists {sorted(documented - logged)} that are not logged "
                                  f"and misses {sorted(logged - documented)}")


@pytest.mark.parametrize("page", sorted(PAGES))
def test_every_table_row_has_the_columns_of_its_header(page):
    """An unescaped '|' inside a cell (e.g. an absolute value) would silently shift the columns of a row."""
    width = None
    for number, line in enumerate(PAGES[page].read_text().splitlines(), start=1):
        if not line.startswith("|"):
            width = None
            continue
        cells = len(re.findall(r"(?<!\\)\|", line))
        width = cells if width is None else width
        assert cells == width, f"{page}:{number}: {cells - 1} columns, the table's header has {width - 1}"


# ----------------------------------------------------------------------------------------------------------
# Code snippets
# ----------------------------------------------------------------------------------------------------------
def python_block(page: str, defines: str) -> str:
    """The one ```python block of a docs page that defines the function ``defines``."""
    blocks = [b for b in re.findall(r"```python\n(.*?)```", PAGES[page].read_text(), flags=re.S)
              if f"def {defines}(" in b]
    assert len(blocks) == 1, f"{page}: expected one python block defining {defines}, found {len(blocks)}"
    return blocks[0]


def test_the_plain_transformers_snippet_reproduces_rlhfkit_score(tmp_path):
    import rm_helpers
    from transformers import AutoModelForSequenceClassification

    from rlhfkit.cli import main
    from rlhfkit.models.reward import RewardModel
    from rlhfkit.utils import read_jsonl

    namespace: dict = {}
    exec(compile(python_block("reward_modeling.md", "rlhfkit_scores"), "docs/reward_modeling.md", "exec"), namespace)
    tokenizer = rm_helpers.make_tokenizer()
    tokenizer.pad_token = tokenizer.eos_token  # the pitfall the saved pad id avoids (as for SmolLM2)
    torch.manual_seed(0)
    rm = RewardModel.from_backbone(rm_helpers.make_sft_folder(tmp_path / "sft"), tokenizer=tokenizer)
    rm.save_pretrained(tmp_path / "rm", tokenizer=tokenizer)
    rows = [{"prompt": r["prompt"], "response": r["chosen"]} for r in rm_helpers.preference_rows(6)]
    data = rm_helpers.write_jsonl(tmp_path / "rows.jsonl", rows)
    assert main(["score", "--model", str(tmp_path / "rm"), "--data", str(data), "--output", str(tmp_path / "s.jsonl"),
                 "--batch_size", "4"]) == 0
    want = torch.tensor([r["score"] for r in read_jsonl(tmp_path / "s.jsonl")])
    got = torch.tensor(namespace["rlhfkit_scores"](str(tmp_path / "rm"), [r["prompt"] for r in rows],
                                                   [r["response"] for r in rows]))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    # the negative control: the joined text, without the EOS, is not what rlhfkit scores
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    with torch.no_grad():
        naive = model(**tokenizer([rows[0]["prompt"] + " " + rows[0]["response"]], return_tensors="pt")).logits
    assert abs(float(naive[0, 0]) - float(want[0])) > 1e-3
