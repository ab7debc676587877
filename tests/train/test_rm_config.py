"""RMTrainConfig validation of the settings that depend on the reward-model kind (decoder, encoder, pairrm): checked
when the config is parsed for an explicit --model_kind, and when `auto` is resolved from the model's config."""

from __future__ import annotations

import pytest
from transformers import BertConfig, LlamaConfig

from rlhfkit.config import parse_config
from rlhfkit.errors import RlhfkitError
from rlhfkit.train.reward_trainer import resolve_kind
from rlhfkit.train.rm_config import RMTrainConfig


def parse(*flags: str, model: str = "m") -> RMTrainConfig:
    return parse_config(RMTrainConfig, ["--model", model, "--data", "d.jsonl", "--output", "out", *flags])


@pytest.mark.parametrize("flags, needle", [
    (["--model_kind", "pairrm", "--center_rewards_coef", "0.1"], "PairRM outputs the probability"),
    (["--model_kind", "pairrm", "--loss", "token_level"], "leave loss at its default"),
    (["--model_kind", "encoder", "--loss", "token_level"], "loss=token_level needs the causal per-token scores"),
    (["--model_kind", "encoder", "--aggregation", "mean"], "--aggregation mean applies to decoder"),
    (["--model_kind", "pairrm", "--aggregation", "sum"], "--aggregation sum applies to decoder"),
    (["--model_kind", "decoder", "--pooling", "mean"], "--pooling mean applies to encoder"),
    (["--model_kind", "pairrm", "--pooling", "mean"], "--pooling mean applies to encoder"),
])
def test_settings_the_explicit_kind_cannot_use_are_rejected_when_parsed(flags, needle):
    with pytest.raises(RlhfkitError, match=needle):
        parse(*flags)


@pytest.mark.parametrize("flags", [
    ["--model_kind", "pairrm"],
    ["--model_kind", "decoder", "--center_rewards_coef", "0.1", "--aggregation", "sum"],
    ["--model_kind", "decoder", "--loss", "token_level", "--aggregation", "mean"],
    ["--model_kind", "encoder", "--pooling", "mean", "--center_rewards_coef", "0.1"],
    # 'auto' defers the kind's rules until the model's config is read
    ["--loss", "token_level", "--pooling", "mean", "--aggregation", "sum"],
])
def test_settings_the_kind_uses_are_accepted(flags):
    parse(*flags)


def _config_folder(tmp_path, config):
    config.save_pretrained(tmp_path)  # AutoConfig is all that `auto` reads
    return str(tmp_path)


@pytest.mark.parametrize("flags, needle", [
    (["--loss", "token_level"], "loss=token_level needs the causal per-token scores of a decoder model, but "
                                "model_kind=auto resolved to 'encoder'"),
    (["--aggregation", "mean"], "--aggregation mean applies to decoder reward models, but model_kind=auto "
                                "resolved to 'encoder'"),
])
def test_auto_resolved_to_an_encoder_is_held_to_the_encoder_rules(tmp_path, flags, needle):
    bert = _config_folder(tmp_path, BertConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                               num_hidden_layers=1, num_attention_heads=4))
    cfg = parse(*flags, model=bert)  # valid until the kind is known
    with pytest.raises(RlhfkitError, match=needle):
        resolve_kind(cfg)
    assert resolve_kind(parse("--pooling", "mean", model=bert)) == "encoder"


def test_auto_resolved_to_a_decoder_is_held_to_the_decoder_rules(tmp_path):
    llama = _config_folder(tmp_path, LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                                 num_hidden_layers=1, num_attention_heads=4))
    with pytest.raises(RlhfkitError, match="--pooling mean applies to encoder reward models, but model_kind=auto "
                                           "resolved to 'decoder'"):
        resolve_kind(parse("--pooling", "mean", model=llama))
    assert resolve_kind(parse("--loss", "token_level", "--aggregation", "mean", model=llama)) == "decoder"
