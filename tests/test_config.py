"""parse_config: dataclass defaults < YAML < flags; unknown keys and bad values are RlhfkitErrors."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from rlhfkit.config import (changed_settings, check_choice, check_range, config_from_dict, load_yaml, parse_config,
                            save_config)
from rlhfkit.errors import RlhfkitError


@dataclass
class Demo:
    model: str = field(metadata={"help": "model path"})
    learning_rate: float = 1e-5
    epochs: int = 1
    bf16: bool = False
    loss: str = "logsigmoid"
    aspects: list[str] | None = None

    def __post_init__(self):
        check_choice("loss", self.loss, ["logsigmoid", "logexp"])
        check_range("learning_rate", self.learning_rate, 0, lo_open=True)


def test_defaults_and_flags():
    cfg = parse_config(Demo, ["--model", "m", "--learning-rate", "0.5", "--bf16"])
    assert cfg == Demo(model="m", learning_rate=0.5, epochs=1, bf16=True)


def test_yaml_then_flags_override(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("model: from_yaml\nepochs: 3\nlearning_rate: 0.25\naspects: [a, b]\n")
    cfg = parse_config(Demo, ["--config", str(y), "--epochs", "5"])
    assert (cfg.model, cfg.epochs, cfg.learning_rate, cfg.aspects) == ("from_yaml", 5, 0.25, ["a", "b"])


def test_unknown_yaml_key_names_file_and_key(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("model: m\nlearnign_rate: 1\n")
    with pytest.raises(RlhfkitError, match=r"c\.yaml.*learnign_rate"):
        parse_config(Demo, ["--config", str(y)])


def test_missing_required_and_unknown_flag():
    with pytest.raises(RlhfkitError, match="--model"):
        parse_config(Demo, [])
    with pytest.raises(RlhfkitError, match=r"not used.*--nope"):
        parse_config(Demo, ["--model", "m", "--nope", "1"])


def test_validation_in_post_init():
    with pytest.raises(RlhfkitError, match="loss='hinge'"):
        parse_config(Demo, ["--model", "m", "--loss", "hinge"])
    with pytest.raises(RlhfkitError, match="learning_rate"):
        parse_config(Demo, ["--model", "m", "--learning_rate", "0"])


def test_save_and_replay(tmp_path):
    cfg = Demo(model="m", epochs=2, aspects=["x"])
    save_config(cfg, tmp_path / "run.yaml")
    assert parse_config(Demo, ["--config", str(tmp_path / "run.yaml")]) == cfg
    assert config_from_dict(Demo, load_yaml(tmp_path / "run.yaml", Demo)) == cfg
    with pytest.raises(RlhfkitError, match="unknown config key"):
        config_from_dict(Demo, {"model": "m", "zzz": 1})


def test_yaml_not_a_mapping(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("- 1\n- 2\n")
    with pytest.raises(RlhfkitError, match="mapping"):
        parse_config(Demo, ["--config", str(y)])
    with pytest.raises(RlhfkitError, match="not found"):
        parse_config(Demo, ["--config", str(tmp_path / "missing.yaml")])


@pytest.mark.parametrize("text, expected", [
    ("model: m\nlearning_rate: 1e-4\nepochs: '3'\n", {"learning_rate": 1e-4, "epochs": 3}),  # texts convert as flags do
    ("model: m\naspects: helpful\n", {"aspects": ["helpful"]}),  # one value for a list field: a one-item list
    ("model: m\naspects: [a, b]\nbf16: true\n", {"aspects": ["a", "b"], "bf16": True}),
])
def test_yaml_values_that_fit_their_fields(tmp_path, text, expected):
    y = tmp_path / "c.yaml"
    y.write_text(text)
    cfg = parse_config(Demo, ["--config", str(y)])
    assert {k: getattr(cfg, k) for k in expected} == expected


@pytest.mark.parametrize("line, message", [
    ("epochs: [1, 2]", "field 'epochs': expected an integer, got a list [1, 2]"),
    ("epochs: 2.5", "field 'epochs': expected an integer, got a float 2.5"),
    ("learning_rate: {a: 1}", "field 'learning_rate': expected a number, got a dict {'a': 1}"),
    ("bf16: 1", "field 'bf16': expected true or false, got an int 1"),
    ("model: 7", "field 'model': expected a text, got an int 7"),
    ("model: null", "field 'model': expected a text, got null"),
    ("aspects: {a: 1}", "field 'aspects': expected a list of texts, got a dict {'a': 1}"),
    ("aspects: [a, 3]", "field 'aspects': expected a list of texts, got a list ['a', 3]"),
])
def test_yaml_value_of_the_wrong_type_names_file_and_field(tmp_path, line, message):
    y = tmp_path / "c.yaml"
    y.write_text(f"model: m\n{line}\n" if not line.startswith("model") else line + "\n")
    with pytest.raises(RlhfkitError) as info:
        parse_config(Demo, ["--config", str(y)])
    assert str(info.value) == f"{y}, {message}"


def test_changed_settings_compares_a_missing_key_with_its_default():
    """A run saved before a field existed lacks its key: it ran with the behaviour that the field's default keeps,
    so the key counts as its default, and only a non-default value (or a real difference) is a change."""

    @dataclass
    class Cfg:
        a: int = 1
        b: list = field(default_factory=lambda: [1, 2])
        c: str = "x"

    saved = {"a": 1, "b": [1, 2]}  # written before field c existed
    assert changed_settings(Cfg(), saved, []) == []
    assert changed_settings(Cfg(c="y"), saved, []) == ["c"]
    assert changed_settings(Cfg(a=2, c="y"), saved, ["c"]) == ["a"]
    assert changed_settings(Cfg(b=[2]), saved, []) == ["b"]
    assert changed_settings(Cfg(), {"a": 1, "b": [1, 2], "c": "z"}, []) == ["c"]
