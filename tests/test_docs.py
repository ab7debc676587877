"""The docs pages cannot drift from the code: their config tables equal the tables generated from the dataclasses,
their metric tables list exactly the metric names the trainers log (collected from tiny real runs), every code
name they cite (modules, files, classes, functions) exists, and their code snippets run and give what they
promise."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import pytest
import torch
from tolerances import assert_close_f32, forward_factor, linear_terms

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
    from rlhfkit.train.reward_trainer import PairwiseObjective, PointwiseObjective, StepOut, micro_batch_sums
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
                  dict(model_kind="pairrm"), dict(model_kind="seq2seq")]:
        cfg = RMTrainConfig(model="m", data="d", output="o", **extra)
        objective = (PairwiseObjective if cfg.pairwise else PointwiseObjective)(cfg, 0)
        zero = torch.zeros((), dtype=torch.float64)
        for prefix in ("rm", "eval"):
            logged |= set(micro_batch_sums(StepOut(zero, {n: zero for n in objective.names}), 1.0, 1).values(prefix))
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
# Code names cited by the docs
# ----------------------------------------------------------------------------------------------------------
ROOT = DOCS.parent
SRC = ROOT / "src" / "rlhfkit"
DESIGN = ROOT.parent / "shared" / "DESIGN.md"  # the team's design guide, beside the repository when present
NAME_PAGES = sorted(DOCS.glob("*.md")) + [ROOT / "README.md"] + ([DESIGN] if DESIGN.is_file() else [])
CONTRACT_PAGE = "architecture.md"  # its bare class names and `function(args)` signatures are rlhfkit's contracts
# Bare names of other libraries on the contract page, each checked to exist in its library (not allow-listed blind).
FOREIGN = {"AutoModelForSequenceClassification": "transformers", "AutoModelForSeq2SeqLM": "transformers",
           "DatasetDict": "datasets",
           "GenericForSequenceClassification": "transformers.modeling_layers"}
# `fn(prompts, responses) -> list[float]`: the user's reward function; `source(prompts, ...)`: any reward source
PLACEHOLDERS = {"fn", "source"}
FILE_SUFFIXES = {"json", "jsonl", "yaml", "yml", "md", "gguf", "png", "gz", "csv", "parquet", "txt", "safetensors",
                 "pt", "py"}
NAME = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*")


def _rlhfkit_modules() -> list[str]:
    import pkgutil

    import rlhfkit

    return ["rlhfkit"] + [m.name for m in pkgutil.walk_packages(rlhfkit.__path__, "rlhfkit.")]


def _defined_names() -> set[str]:
    """Every name rlhfkit's source defines: module-level functions, classes and assignments, and class members."""
    import ast

    names: set[str] = set()

    def collect(body: list) -> None:
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
                if isinstance(node, ast.ClassDef):
                    collect(node.body)
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                    names.update(n.id for n in ast.walk(target) if isinstance(n, ast.Name))

    for path in SRC.rglob("*.py"):
        collect(ast.parse(path.read_text()).body)
    return names


def _instance_attributes(class_name: str) -> set[str]:
    """The names a class of rlhfkit's source assigns as ``self.<name> = ...`` in its own methods."""
    import ast

    names: set[str] = set()
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and node.name == class_name:
                names.update(t.attr for t in ast.walk(node) if isinstance(t, ast.Attribute)
                             and isinstance(t.ctx, ast.Store) and isinstance(t.value, ast.Name) and t.value.id == "self")
    return names


def code_spans(text: str) -> list[tuple[int, str]]:
    """(line, text) of every inline code span outside fenced blocks (whose commands and diagrams are not names);
    a span broken over lines is joined (directly after a dot: `core.masks.` + `position_ids_from_mask`)."""
    text = re.sub(r"^```.*?^```", lambda m: "\n" * m.group().count("\n"), text, flags=re.S | re.M)
    spans = []
    for m in re.finditer(r"`([^`]+)`", text):
        if "\n\n" not in m.group(1):
            span = re.sub(r"\s*\n\s*", " ", re.sub(r"\.\n\s*", ".", m.group(1))).strip()
            spans.append((text.count("\n", 0, m.start()) + 1, span))
    return spans


def _signature(span: str) -> tuple[str, bool, str] | None:
    """`name`, `name(args)` or `name(args) -> result` -> (name, called, result); None for anything else."""
    m = NAME.match(span)
    if m is None:
        return None
    name, rest, called, result = m.group(), span[m.end():], False, ""
    if rest.startswith("("):
        depth = 0
        for i, c in enumerate(rest):
            depth += {"(": 1, ")": -1}.get(c, 0)
            if depth == 0:
                break
        if depth:
            return None
        rest, called = rest[i + 1:].strip(), True
        if rest.startswith("->"):
            rest, result = "", rest[2:]
    return None if rest else (name, called, result)


def _has(obj: object, attr: str) -> bool:
    return hasattr(obj, attr) or attr in getattr(obj, "__dataclass_fields__", {}) or attr in getattr(
        obj, "__annotations__", {})


def _resolves(obj: object, attrs: list[str]) -> bool:
    for attr in attrs:
        if not _has(obj, attr):
            return False
        obj = getattr(obj, attr, None)
    return True


class NameChecker:
    """Resolves the code names a docs page cites against the rlhfkit package (and a few named other libraries).

    Checked: file paths (`train/ppo_update.py`, `src/rlhfkit/`; `*.py` globs), module-qualified names
    (`core.masks.masked_whiten`, `rlhfkit.models.reward.RewardModel`, `masks.masked_whiten`: the root is rlhfkit or
    one of its packages or submodules), class-qualified names (`RewardModel.forward`) and, on the contract page,
    bare class names and constants (`RewardModel`, `KL_ESTIMATORS`), `function(args)` signatures and the class
    names of their results. Not names: CLI flags, metric names (`objective/kl`), config keys, file names
    (`config.yaml`), formulas, acronyms (`TRL`), other libraries (`torch`) and dotted names rooted elsewhere
    (`torch.multinomial`; unprefixed `config.…` is a model's Hugging Face config: rlhfkit's top-level modules are
    always cited as `rlhfkit.config`).
    """

    def __init__(self) -> None:
        import builtins

        self.modules = _rlhfkit_modules()
        top_level = {m for m in self.modules if m.count(".") == 1 and not (SRC / m.split(".")[1]).is_dir()}
        self.roots = {"rlhfkit"} | {m.rsplit(".", 1)[1] for m in self.modules if m.count(".") and m not in top_level}
        self.defined = _defined_names()
        self.builtins = set(dir(builtins))

    def unresolved(self, page: str, text: str) -> list[str]:
        return [f"{page}:{line}: `{span}`" for line, span in code_spans(text) if not self.resolves(span, page)]

    def resolves(self, span: str, page: str) -> bool:
        if re.fullmatch(r"[\w./*-]+", span) and (span.endswith(".py") or span.startswith(("src/", "rlhfkit/"))):
            return self._path(span)
        sig = _signature(span)
        if sig is None:
            return True  # not a code name: a flag, a metric, a formula, a command line
        name, called, result = sig
        parts = name.split(".")
        contract = page == CONTRACT_PAGE
        if len(parts) > 1 and parts[-1] in FILE_SUFFIXES:
            return True  # a file name such as config.yaml
        if len(parts) > 1 and parts[0] in self.roots:
            return self._qualified(parts)
        if len(parts) > 1 and parts[0][0].isupper():
            return self._class_member(parts)
        ok = True
        if contract and len(parts) == 1 and (called or re.fullmatch(r"[A-Z]\w*([a-z]|_)\w*", name)):
            ok = self._bare(parts[0])
        if contract and result:
            ok &= all(self._bare(n) for n in re.findall(r"\b[A-Z]\w*[a-z]\w*", result))
        return ok

    def _path(self, span: str) -> bool:
        bases = [ROOT, ROOT / "src", SRC]
        if any(any(base.glob(span.rstrip("/"))) for base in bases):
            return True
        head = span.split("/", 1)[0]
        if "/" in span and not any((base / head).is_dir() for base in bases):
            return True  # another project's file (e.g. `lm_human_preferences/language/model.py`), not ours
        return "/" not in span and any(SRC.rglob(span))  # a module file named by itself, e.g. `masks.py`

    def _qualified(self, parts: list[str]) -> bool:
        import importlib

        for i in range(len(parts), 0, -1):
            prefix = ".".join(parts[:i])
            for module in self.modules:
                if module == prefix or module.endswith("." + prefix):
                    if _resolves(importlib.import_module(module), parts[i:]):
                        return True
        return False

    def _class_member(self, parts: list[str]) -> bool:
        import importlib

        if parts[0] in FOREIGN:
            return _resolves(importlib.import_module(FOREIGN[parts[0]]), parts)
        if any(_resolves(importlib.import_module(m), parts) for m in self.modules
               if parts[0] in vars(importlib.import_module(m))):
            return True
        return len(parts) == 2 and parts[1] in _instance_attributes(parts[0])  # e.g. `RewardModel.convention`

    def _bare(self, name: str) -> bool:
        import importlib

        if name in FOREIGN:
            return hasattr(importlib.import_module(FOREIGN[name]), name)
        return name in self.defined or name in PLACEHOLDERS or name in self.builtins


@pytest.fixture(scope="module")
def name_checker():
    return NameChecker()


def test_every_code_name_the_docs_cite_exists(name_checker):
    assert DOCS / CONTRACT_PAGE in NAME_PAGES
    missing = [m for path in NAME_PAGES for m in name_checker.unresolved(path.name, path.read_text())]
    assert not missing, "the docs cite names that do not exist in rlhfkit:\n" + "\n".join(missing)


def test_the_name_check_catches_stale_names_and_ignores_what_is_not_a_name(name_checker):
    page = """
Stale: `core.masks.no_such_function`, `rlhfkit.models.reward.NoSuchModel`, `train/no_such.py`, `masks.nope`,
`RewardModel.no_such_method`, `no_such_module.py`, `src/rlhfkit/no_such/`, `core.masks.
no_such_after_a_break`.
Contract only: `NoSuchClass`, `NO_SUCH_CONSTANT`, `no_such_function(x, mask=None)`,
`masked_mean(x) -> NoSuchResult(a, b)`.
Real: `core.masks.masked_whiten`, `RewardModel.convention`, `rlhfkit.models.reward.RewardModel`, `train/ppo_update.py`, `masks.py`,
`RewardModel.forward`, `masked_mean(x, mask, dim=None)`, `rlhfkit.errors.data_error(path, row, field, problem)`,
`core.masks.
position_ids_from_mask`, `RewardOutput`, `KL_ESTIMATORS`, `RMTrainConfig.model`, `rlhfkit/train/rm_config.py`,
`*_config.py`, `AutoModelForSequenceClassification.from_pretrained(folder)`, `DatasetDict`, `fn(prompts, responses) -> list[float]`.
Not names: `--center_rewards_coef`, `objective/kl`, `train/lr`, `kl_coef`, `config.pad_token_id`, `config.yaml`,
`torch.multinomial`, `transformers.get_scheduler`, `models/reward_model/`, `1/sqrt(H+1)`, `max(p, 1 − p)`,
`exp(−d) − 1 + d`, `scores (B,)`, `python -m rlhfkit.docgen`, `None`, `TRL`, `PPO`, `transformers`, `torch`.
```bash
rlhfkit rm train --model `core.masks.inside_a_fence`
```
"""
    assert [m.split(": ", 1)[1] for m in name_checker.unresolved(CONTRACT_PAGE, page)] == [
        "`core.masks.no_such_function`", "`rlhfkit.models.reward.NoSuchModel`", "`train/no_such.py`", "`masks.nope`",
        "`RewardModel.no_such_method`", "`no_such_module.py`", "`src/rlhfkit/no_such/`",
        "`core.masks.no_such_after_a_break`", "`NoSuchClass`", "`NO_SUCH_CONSTANT`",
        "`no_such_function(x, mask=None)`", "`masked_mean(x) -> NoSuchResult(a, b)`"]
    # elsewhere bare names and signatures are prose (`masked_mean(x)` may be a formula); qualified names still count
    other = [m.split(": ", 1)[1] for m in name_checker.unresolved("ppo.md", page)]
    assert other == ["`core.masks.no_such_function`", "`rlhfkit.models.reward.NoSuchModel`", "`train/no_such.py`",
                     "`masks.nope`", "`RewardModel.no_such_method`", "`no_such_module.py`", "`src/rlhfkit/no_such/`",
                     "`core.masks.no_such_after_a_break`"]


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
    with contextlib.ExitStack() as stack:
        heads = []

        def load(*args, **kwargs):  # the snippet's own model, with its head's terms recorded
            model = AutoModelForSequenceClassification.from_pretrained(*args, **kwargs)
            heads.append(stack.enter_context(linear_terms(model.score)))
            return model

        namespace["AutoModelForSequenceClassification"] = SimpleNamespace(from_pretrained=load)
        got = torch.tensor(namespace["rlhfkit_scores"](str(tmp_path / "rm"), [r["prompt"] for r in rows],
                                                       [r["response"] for r in rows]))
    # plain transformers on one batch vs rlhfkit's forward in batches of 4: float32 through the 2 decoder layers in
    # other batch shapes, relative to the head's terms of each row
    assert_close_f32(got, want, heads[0][0].flatten(1).amax(1), forward_factor(2), "snippet")
    # the negative control: the joined text, without the EOS, is not what rlhfkit scores
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    with torch.no_grad():
        naive = model(**tokenizer([rows[0]["prompt"] + " " + rows[0]["response"]], return_tensors="pt")).logits
    assert abs(float(naive[0, 0]) - float(want[0])) > 1e-3
