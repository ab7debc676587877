"""`models.trunk.TrunkCache` in reward-model training: a micro-batch whose rows' lower-block states come from the
cache gives the loss and gradients of the plain forward (float64); rows the cache lacks are computed; a backbone
whose lower blocks are trained or differ is refused, and `RewardTrainer` says so and computes every row."""

from __future__ import annotations

import pytest
import torch
from rm_helpers import EOS, PAD, make_sft_folder, one_thread  # noqa: F401 (autouse)
from tolerances import float64_rms_norm
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from rlhfkit.data.tokenize import TokenizedPair, collate_pairs
from rlhfkit.models.adapters import freeze_lower_layers
from rlhfkit.models.reward import RewardModel
from rlhfkit.models.trunk import TrunkCache, run_blocks
from rlhfkit.train.rm_eval import forward_pairs


def kwise_batch():
    """One prompt, 3 responses, all 3 pairs (6 rows, 3 distinct), and a pair of another prompt."""
    prompt, other = [5, 6, 7], [9, 4]
    a, b, c = [8, 9, 10, 11, EOS], [12, 13, EOS], [14, 15, 16, EOS]
    pair = lambda p, x, y: TokenizedPair(p + x, p + y, len(p), len(p), None, 0)  # noqa: E731
    return [pair(prompt, a, b), pair(prompt, a, c), pair(prompt, c, b), pair(other, [20, 21, EOS], [22, EOS])]


def states(decoder, ids: list[int], layers: int) -> torch.Tensor:
    row = torch.tensor([ids])
    with torch.no_grad():
        return run_blocks(decoder, torch.ones_like(row, dtype=torch.bool), 0, layers, input_ids=row)[0]


@pytest.mark.parametrize("packing", [False, True])
def test_cached_lower_blocks_give_the_plain_loss_and_gradients(tmp_path, monkeypatch, packing):
    """Block 0 of 2 frozen; the cache holds the states after it for 4 of the 5 distinct rows (one miss, computed
    by the cache's decoder). Loss-like output and every gradient equal the plain forward's to 1e-12 (float64,
    RMSNorm without its float32 cast); only the 4 cached rows count as hits."""
    monkeypatch.setattr(LlamaRMSNorm, "forward", float64_rms_norm)
    torch.manual_seed(0)
    model = RewardModel.from_backbone(str(make_sft_folder(tmp_path / "sft")), aggregation="last").double().train()
    freeze_lower_layers(model, 1)
    backbone = model._backbone()
    cache = TrunkCache(backbone, 1)
    assert cache.usable_for(backbone) is None
    items = kwise_batch()
    rows = list(dict.fromkeys(tuple(ids) for it in items for ids in (it.chosen_ids, it.rejected_ids)))
    assert len(rows) == 5
    for ids in rows[:4]:
        cache.add(list(ids), states(backbone, list(ids), 1))
    batch = collate_pairs(items, PAD)

    def run(trunk_cache):
        model.zero_grad(set_to_none=True)
        diff, chosen, rejected, out = forward_pairs(model, batch, True, packing, trunk_cache)
        (torch.nn.functional.logsigmoid(diff).sum() + out.token_scores.square().sum()).backward()
        return diff.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain_diff, plain_grads = run(None)
    cached_diff, cached_grads = run(cache)
    assert (cache.hits, cache.misses) == (4, 1)
    torch.testing.assert_close(cached_diff, plain_diff, rtol=0, atol=1e-12)
    assert plain_grads.keys() == cached_grads.keys() and plain_grads
    assert not any(name.startswith("model.layers.0.") or "embed" in name for name in plain_grads)  # frozen
    for name, g in plain_grads.items():
        torch.testing.assert_close(cached_grads[name], g, rtol=0, atol=1e-12 * float(g.abs().max()) + 1e-15)
    assert float(plain_diff.abs().max()) > 1e-3  # distinct responses score differently: the test has teeth


def test_a_trained_or_different_backbone_is_refused(tmp_path):
    """Refused: trainable lower blocks (for training), other weights, another autocast, dropout in the lower blocks
    (for training); bad sizes are errors."""
    torch.manual_seed(0)
    model = RewardModel.from_backbone(str(make_sft_folder(tmp_path / "sft")), aggregation="last")
    other = RewardModel.from_backbone(str(make_sft_folder(tmp_path / "other", seed=1)), aggregation="last")
    cache = TrunkCache(model._backbone(), 1)
    assert "trained" in cache.usable_for(model._backbone())  # nothing frozen yet
    assert cache.usable_for(model._backbone(), training=False) is None  # scoring needs no frozen blocks
    freeze_lower_layers(other, 1)
    assert "not the cached decoder's" in cache.usable_for(other._backbone())
    freeze_lower_layers(model, 1)
    assert cache.usable_for(model._backbone()) is None
    assert "autocast" in cache.usable_for(model._backbone(), autocast_dtype=torch.bfloat16)  # not how they were made
    model._backbone().config.attention_dropout = 0.1  # the plain path would drop, the cached states did not
    assert "dropout" in cache.usable_for(model._backbone())
    assert cache.usable_for(model._backbone(), training=False) is None
    with pytest.raises(ValueError, match="3 blocks|layers=3"):
        TrunkCache(model._backbone(), 3)
    with pytest.raises(ValueError, match="states"):
        cache.add([5, 6], torch.zeros(3, 32))


def test_reward_trainer_uses_a_usable_cache_and_says_why_it_ignores_another(tmp_path, capsys):
    """`RewardTrainer(trunk_cache=...)`: with freeze_layers = 1 and the SFT decoder's states it reports how many rows
    ran only the upper block; with nothing frozen it says why the cache is not used, and trains anyway."""
    from rm_helpers import preference_rows, write_jsonl
    from transformers import AutoModelForCausalLM

    from rlhfkit.data.tokenize import encode_for_rm
    from rlhfkit.models.loading import load_tokenizer
    from rlhfkit.train.reward_trainer import RewardTrainer
    from rlhfkit.train.rm_config import RMTrainConfig

    sft = make_sft_folder(tmp_path / "sft")
    rows = preference_rows(8, seed=2)
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    decoder = AutoModelForCausalLM.from_pretrained(sft).model.eval()
    tokenizer = load_tokenizer(str(sft))
    cache = TrunkCache(decoder, 1)
    for row in rows:
        for response in (row["chosen"], row["rejected"]):
            p, r = encode_for_rm(tokenizer, row["prompt"], response)
            cache.add(p + r, states(decoder, p + r, 1))

    def train(out: str, freeze: int) -> str:
        cfg = RMTrainConfig(model=str(sft), data=str(data), output=str(tmp_path / out), batch_size=4,
                            micro_batch_size=2, epochs=1, freeze_layers=freeze, eval_fraction=0.0, logging_steps=1)
        RewardTrainer(cfg, trunk_cache=cache).train()
        return capsys.readouterr().out

    printed = train("frozen", 1)
    assert "trunk_cache: 16 of 16 rows ran only the blocks above 1" in printed
    printed = train("trained", 0)
    assert "trunk_cache not used: its embeddings or lowest 1 blocks are trained" in printed


def test_held_out_evaluation_from_the_cache_equals_the_plain_one(tmp_path, monkeypatch):
    """`evaluate_reward_model(trunk_cache=...)`: a float64 reward model whose block 0 the cache holds for every
    response (states of one forward each) gives the metrics of the plain evaluation (accuracy exactly, margin and
    ECE to 1e-12) and reads every distinct row from the cache; a cache made under another autocast is not used."""
    from rm_helpers import preference_rows
    from transformers import AutoTokenizer

    from rlhfkit.data.preference import parse_preferences
    from rlhfkit.data.tokenize import encode_for_rm
    from rlhfkit.train.rm_eval import evaluate_reward_model

    monkeypatch.setattr(LlamaRMSNorm, "forward", float64_rms_norm)
    sft = make_sft_folder(tmp_path / "sft")
    torch.manual_seed(0)
    model = RewardModel.from_backbone(str(sft), aggregation="last").double().eval()
    tokenizer = AutoTokenizer.from_pretrained(sft)
    rows = preference_rows(12, seed=4)
    examples = parse_preferences(rows)
    cache = TrunkCache(model._backbone(), 1)
    for row in rows:
        for response in (row["chosen"], row["rejected"]):
            p, r = encode_for_rm(tokenizer, row["prompt"], response)
            cache.add(p + r, states(model._backbone(), p + r, 1))
    plain = evaluate_reward_model(model, tokenizer, examples, batch_size=4)
    cached = evaluate_reward_model(model, tokenizer, examples, batch_size=4, trunk_cache=cache)
    assert cache.misses == 0 and cache.hits == len(cache) == 24
    assert cached["accuracy"] == plain["accuracy"] and cached["n"] == plain["n"] == 12
    for key in ("margin", "ece"):
        assert abs(cached[key] - plain[key]) <= 1e-12, key
    assert abs(plain["margin"]) > 1e-3  # scores differ between responses: the comparison has teeth
    other = TrunkCache(model._backbone(), 1, autocast_dtype=torch.bfloat16)
    other.states = cache.states
    evaluate_reward_model(model, tokenizer, examples, batch_size=4, trunk_cache=other)
    assert other.hits == other.misses == 0  # refused: never consulted
