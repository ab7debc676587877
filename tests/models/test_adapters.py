"""LoRA (peft) and layer freezing on reward models and plain causal LMs."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from peft import PeftModel
from tolerances import assert_close_f32, forward_factor, linear_terms
from transformers import AutoModelForSequenceClassification

from rlhfkit.errors import RlhfkitError
from rlhfkit.models.adapters import apply_lora, freeze_lower_layers, has_lora, merge_lora_for_save
from rlhfkit.models.loading import causal_lm_logits, load_causal_lm
from rlhfkit.models.reward import RewardModel

LENGTHS = [5, 8, 2]


def _trainable(module: torch.nn.Module) -> list[str]:
    return [n for n, p in module.named_parameters() if p.requires_grad]


def _perturb_lora_b(module: torch.nn.Module) -> None:
    """LoRA's B starts at 0 (a no-op adapter); give it random values so merging has something to merge."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def test_lora_on_decoder_reward_model_trains_only_adapters_and_head(sft_dir, make_batch, tokenizer):
    rm = RewardModel.from_backbone(sft_dir)
    ids, mask = make_batch(LENGTHS, len(tokenizer), pad_id=0)
    with torch.no_grad():
        before = rm(ids, mask).scores
    assert apply_lora(rm, r=4, alpha=8) is rm and has_lora(rm)
    names = _trainable(rm)
    lora = [n for n in names if "lora_" in n]
    head = [n for n in names if "score" in n]
    assert sorted(names) == sorted(lora + head)
    assert len(lora) == 2 * 7 * 2  # 2 layers x (q, k, v, o, gate, up, down projections) x (A, B): all-linear
    assert head and all("modules_to_save" in n for n in head)
    with torch.no_grad():  # B = 0 at init: the adapted model scores as before, exactly (base + 0, same kernels)
        torch.testing.assert_close(rm(ids, mask).scores, before, rtol=0, atol=0)
    rm(ids, mask).scores.sum().backward()
    assert all(p.grad is not None for n, p in rm.named_parameters() if p.requires_grad)
    with pytest.raises(RlhfkitError, match="already"):
        apply_lora(rm)


def test_merged_lora_reward_model_saves_as_a_plain_hf_folder(sft_dir, tokenizer, make_batch, tmp_path):
    rm = RewardModel.from_backbone(sft_dir)
    apply_lora(rm, r=4, alpha=8)
    _perturb_lora_b(rm)
    with torch.no_grad():
        rm.model.base_model.model.score.modules_to_save["default"].weight.mul_(3.0)  # the trained head copy
    ids, mask = make_batch(LENGTHS, len(tokenizer), pad_id=0)
    with torch.no_grad():
        adapted = rm(ids, mask).scores
        merged = merge_lora_for_save(rm)
        assert not has_lora(merged) and has_lora(rm)  # a merged copy; the training model keeps its adapters
        with linear_terms(merged._head()) as terms:
            merged_scores = merged(ids, mask).scores
    # W + s·BA rounded once vs x·W + s·(x·A)·B: float32 through the 2 decoder layers, relative to the head's terms
    scale, factor = terms[0].max(), forward_factor(2)
    assert_close_f32(merged_scores, adapted, scale, factor, "merged")
    rm.save_pretrained(tmp_path, tokenizer=tokenizer)  # merges a copy automatically
    assert not (tmp_path / "adapter_config.json").exists()
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path)
    assert not any("lora" in k for k in hf.state_dict())
    with torch.no_grad():
        assert_close_f32(hf(input_ids=ids, attention_mask=mask.long()).logits[:, 0], adapted, scale, factor, "hf")
        assert_close_f32(RewardModel.from_pretrained(tmp_path)(ids, mask).scores, adapted, scale, factor, "loaded")


def test_lora_on_encoder_reward_model_keeps_the_head_trainable(bert_dir):
    rm = RewardModel.from_backbone(bert_dir, kind="encoder")
    apply_lora(rm, r=2)
    names = _trainable(rm)
    assert "head.weight" in names
    assert sorted(n for n in names if n != "head.weight") == sorted(n for n in names if "lora_" in n)
    # head + 2 layers x (query, key, value, attention output, intermediate, output dense) x (A, B): all-linear
    assert len(names) == 1 + 2 * 6 * 2


def test_lora_on_a_causal_lm_returns_a_peft_model_that_merges(sft_dir, make_batch, tokenizer):
    base = load_causal_lm(sft_dir)
    policy = apply_lora(base, r=4, alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    assert isinstance(policy, PeftModel)
    assert all("lora_" in n for n in _trainable(policy)) and len(_trainable(policy)) == 2 * 4 * 2
    _perturb_lora_b(policy)
    ids, mask = make_batch(LENGTHS, len(tokenizer), pad_id=2)
    with torch.no_grad():
        adapted = causal_lm_logits(policy, ids, mask)
        merged = merge_lora_for_save(policy)
        assert not isinstance(merged, PeftModel)
        with linear_terms(merged.lm_head) as terms:
            merged_logits = causal_lm_logits(merged, ids, mask)
    # merged vs adapted projections: float32 through the 2 decoder layers, relative to the LM head's terms
    assert_close_f32(merged_logits, adapted, terms[0].max(), forward_factor(2), "merged logits")


PROJECTIONS = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
               "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}  # Llama's linear layers but lm_head


def _adapted(model: torch.nn.Module) -> set[str]:
    """Names (without peft's prefix) of the modules holding a LoRA adapter."""
    return {n.split("base_model.model.", 1)[-1] for n, m in model.named_modules() if hasattr(m, "lora_A")}


@pytest.mark.parametrize("targets", [None, ["all-linear"]])  # the API default and the command line's spelling
def test_default_lora_targets_every_attention_and_mlp_projection_but_not_the_output_layer(sft_dir, targets):
    from rlhfkit.train.ppo_config import PPOConfig
    from rlhfkit.train.rm_config import RMTrainConfig

    assert {f.name: f.default for f in dataclasses.fields(PPOConfig)}["lora_target_modules"] is None
    assert {f.name: f.default for f in dataclasses.fields(RMTrainConfig)}["lora_target_modules"] is None
    policy = apply_lora(load_causal_lm(sft_dir), r=4, target_modules=targets)
    adapted = _adapted(policy)
    assert adapted == {f"model.layers.{i}.{block}.{name}" for i in range(2) for name, block in PROJECTIONS.items()}
    assert not any("lm_head" in n for n in adapted)
    assert all("lora_" in n for n in _trainable(policy))  # lm_head and embeddings frozen
    # the reward model: the same projections; its `score` head is not adapted but trained in full
    rm = apply_lora(RewardModel.from_backbone(sft_dir), r=4, target_modules=targets)
    assert {n.rsplit(".", 1)[-1] for n in _adapted(rm.model)} == set(PROJECTIONS) and len(_adapted(rm.model)) == 14
    head = [n for n in _trainable(rm) if "score" in n]
    assert head == ["model.base_model.model.score.modules_to_save.default.weight"]


def test_freeze_lower_layers_freezes_embeddings_and_first_blocks(sft_dir, bert_dir):
    rm = RewardModel.from_backbone(sft_dir)
    freeze_lower_layers(rm, 1)
    frozen = {n for n, p in rm.named_parameters() if not p.requires_grad}
    assert "model.model.embed_tokens.weight" in frozen
    assert frozen == {"model.model.embed_tokens.weight"} | {
        n for n, _ in rm.named_parameters() if n.startswith("model.model.layers.0.")}
    assert "model.score.weight" not in frozen and "model.model.norm.weight" not in frozen

    enc = RewardModel.from_backbone(bert_dir, kind="encoder")
    freeze_lower_layers(enc, 2)
    trainable = _trainable(enc)
    assert trainable == ["head.weight"]  # embeddings (word, position, type, LayerNorm) and both blocks frozen
    with pytest.raises(RlhfkitError, match="2 transformer blocks"):
        freeze_lower_layers(enc, 3)


def test_attaching_lora_raises_no_deprecation_warning():
    """peft reads transformers' deprecated ``is_gradient_checkpointing`` (a FutureWarning on transformers 5.24):
    rlhfkit's LoRA path warns about nothing."""
    import warnings

    from transformers import LlamaConfig, LlamaForCausalLM

    from rlhfkit.models.adapters import apply_lora

    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        apply_lora(model, r=2, alpha=4)
