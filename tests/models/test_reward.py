"""Reward models: aggregation against hand computation, padding invariance, pad == EOS, HF round trip,
metadata, multi-aspect, encoder pooling, head initialisation, dropout, critic (zero value head, and refusal of a
reward model that cannot read the policy's token ids)."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from tolerances import assert_close_f32, forward_factor, linear_terms
from torch import nn
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from rlhfkit.errors import RlhfkitError
from rlhfkit.models.loading import forward_hidden
from rlhfkit.models.reward import (
    METADATA_FILE,
    RewardModel,
    init_head_,
    load_critic,
    reward_pad_token_id,
)

F64 = dict(rtol=0, atol=1e-12)
LENGTHS = [7, 4, 9, 1]


@pytest.fixture(scope="module")
def rm64(sft_dir):
    torch.manual_seed(0)
    return RewardModel.from_backbone(sft_dir, dtype=torch.float64)


def _hidden(rm: RewardModel, ids, mask) -> torch.Tensor:
    """The backbone's last hidden states, computed independently of RewardModel.forward."""
    with torch.no_grad():
        return forward_hidden(rm.model.model, ids, mask)


def test_last_aggregation_matches_hand_computation(rm64, make_batch, tokenizer):
    ids, mask = make_batch(LENGTHS, len(tokenizer), pad_id=0)
    with torch.no_grad():
        out = rm64(ids, mask)
    h = _hidden(rm64, ids, mask)
    w = rm64.model.score.weight[0]  # (H,)
    # score_b = h[b, n_b - 1] · w  (last real token of a right-padded row, no bias)
    expected = torch.stack([h[b, n - 1] @ w for b, n in enumerate(LENGTHS)])
    assert out.scores.dtype == torch.float64 and out.scores.shape == (4,)
    torch.testing.assert_close(out.scores, expected, **F64)
    # token scores: h[b, t] · w on real tokens, 0 on padding
    torch.testing.assert_close(out.token_scores, torch.where(mask, h @ w, 0.0), **F64)
    assert out.aspect_scores is None and out.aspect_token_scores is None


@pytest.mark.parametrize("aggregation", ["mean", "sum"])
def test_mean_and_sum_aggregation_match_hand_computation(sft_dir, make_batch, tokenizer, aggregation):
    rm = RewardModel.from_backbone(sft_dir, aggregation=aggregation, dtype=torch.float64)
    ids, mask = make_batch(LENGTHS, len(tokenizer), pad_id=0)
    # responses: positions 2..n-1 of each row (row of length 1: position 0)
    response_mask = torch.zeros_like(mask)
    for b, n in enumerate(LENGTHS):
        response_mask[b, min(2, n - 1):n] = True
    with torch.no_grad():
        out = rm(ids, mask, response_mask)
    h = _hidden(rm, ids, mask)
    w = rm.model.score.weight[0]
    rows = []
    for b, n in enumerate(LENGTHS):
        s = min(2, n - 1)
        total = sum(h[b, t] @ w for t in range(s, n))  # Σ_{t in response} h_t · w
        rows.append(total if aggregation == "sum" else total / (n - s))
    torch.testing.assert_close(out.scores, torch.stack(rows), **F64)
    with pytest.raises(RlhfkitError, match="response_mask"):
        rm(ids, mask)


def test_left_and_right_padding_give_the_same_scores(rm64, make_batch, to_left, tokenizer):
    ids, mask = make_batch(LENGTHS, len(tokenizer), pad_id=0)
    left_ids, left_mask = to_left(ids, mask, pad_id=0)
    with torch.no_grad():
        right, left = rm64(ids, mask), rm64(left_ids, left_mask)
    torch.testing.assert_close(left.scores, right.scores, rtol=0, atol=1e-10)
    L = ids.shape[1]
    for b, n in enumerate(LENGTHS):  # per-token scores of the real tokens, wherever they sit
        torch.testing.assert_close(left.token_scores[b, L - n:], right.token_scores[b, :n], rtol=0, atol=1e-10)


def test_pad_equal_to_eos_reads_the_eos_token(rm64, tokenizer):
    eos = tokenizer.eos_token_id
    assert tokenizer.pad_token_id == eos == 2
    rows = [tokenizer("Hello there")["input_ids"] + [eos], tokenizer("A longer answer, really")["input_ids"] + [eos]]
    L = max(map(len, rows))
    ids = torch.full((2, L), eos)  # pad == EOS, as in SmolLM2
    mask = torch.zeros((2, L), dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = True
    with torch.no_grad():
        out = rm64(ids, mask)
    for i, r in enumerate(rows):
        assert out.scores[i] == out.token_scores[i, len(r) - 1]  # the EOS position
        assert out.scores[i] != out.token_scores[i, len(r) - 2]
    # the id saved as config.pad_token_id (and used for padding) is not EOS: SmolLM2's unk `<|endoftext|>` (0)
    assert reward_pad_token_id(tokenizer) == 0 == rm64.pad_token_id


def test_hf_sequence_classifier_loads_the_folder_and_scores_the_same(sft_dir, tokenizer, tmp_path):
    torch.manual_seed(0)
    rm = RewardModel.from_backbone(sft_dir)
    rm.save_pretrained(tmp_path, tokenizer=tokenizer)
    texts = ["Hi!<|im_end|>", "A much longer reply about the weather today.<|im_end|>", "ok<|im_end|>"]
    hf_tok = AutoTokenizer.from_pretrained(tmp_path)
    assert hf_tok.pad_token_id == rm.pad_token_id == 0 and hf_tok.eos_token_id == 2
    enc = hf_tok(texts, padding=True, return_tensors="pt")  # right-padded with id 0
    n = enc["attention_mask"].sum(dim=1)
    assert n.min() < n.max()  # real padding, with id 0, and each row ends with EOS
    assert all(enc["input_ids"][b, n[b] - 1] == 2 and (enc["input_ids"][b, n[b]:] == 0).all() for b in range(3))
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path)
    with torch.no_grad(), linear_terms(rm._head()) as terms:
        ours = rm(enc["input_ids"], enc["attention_mask"].bool()).scores
        theirs = hf(**enc).logits[:, 0]
    # HF's own forward (its masks and kernels): float32 through the 2 decoder layers, relative to the head's terms
    assert_close_f32(theirs, ours, terms[0].max(), forward_factor(2), "hf")
    # negative control: with pad_token_id = EOS, HF skips the final EOS and reads another token
    hf.config.pad_token_id = 2
    ids_eos_pad = torch.where(enc["attention_mask"].bool(), enc["input_ids"], 2)
    with torch.no_grad():
        wrong = hf(input_ids=ids_eos_pad, attention_mask=enc["attention_mask"]).logits[:, 0]
    assert (wrong - ours).abs().min() > 1e-4


def test_metadata_round_trip(sft_dir, tokenizer, tmp_path, make_batch):
    rm = RewardModel.from_backbone(sft_dir, num_aspects=2, aspect_names=["helpful", "harmless"],
                                   aspect_weights=[0.25, 0.75])
    rm.set_normalization(mean=1.5, std=2.0)
    rm.save_pretrained(tmp_path, tokenizer=tokenizer)
    meta = json.loads((tmp_path / METADATA_FILE).read_text())
    assert meta == {
        "format_version": 1, "kind": "decoder", "backbone_kind": "decoder", "aggregation": "last", "pooling": None,
        "aspects": {"names": ["helpful", "harmless"], "weights": [0.25, 0.75]},
        "normalization": {"mean": 1.5, "std": 2.0}, "pad_token_id": 0, "convention": "rlhfkit",
    }
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == ["model.safetensors"]
    back = RewardModel.from_pretrained(tmp_path)
    assert (back.kind, back.aggregation, back.aspect_names) == ("decoder", "last", ["helpful", "harmless"])
    assert back.aspect_weights.tolist() == [0.25, 0.75] and back.normalization == {"mean": 1.5, "std": 2.0}
    assert back.convention == "rlhfkit"
    ids, mask = make_batch(LENGTHS, len(tokenizer), pad_id=0)
    with torch.no_grad():
        a, b = rm(ids, mask), back(ids, mask)
    torch.testing.assert_close(b.aspect_scores, a.aspect_scores, rtol=0, atol=0)
    # normalize: (s - 1.5) / 2
    torch.testing.assert_close(back.normalize(torch.tensor([1.5, 3.5, -0.5])), torch.tensor([0.0, 1.0, -1.0]))
    assert back.config.id2label == {0: "helpful", 1: "harmless"}
    with pytest.raises(RlhfkitError, match="std > 0"):
        back.set_normalization(0.0, 0.0)


def test_multi_aspect_scores_combine_with_the_weights(sft_dir, make_batch, tokenizer):
    weights = [0.5, -1.0, 2.0]
    rm = RewardModel.from_backbone(sft_dir, num_aspects=3, aspect_weights=weights, dtype=torch.float64)
    assert rm.aspect_names == ["aspect_0", "aspect_1", "aspect_2"]
    ids, mask = make_batch(LENGTHS, len(tokenizer), pad_id=0)
    with torch.no_grad():
        out = rm(ids, mask)
    h = _hidden(rm, ids, mask)
    W = rm.model.score.weight  # (3, H)
    aspects = torch.stack([W @ h[b, n - 1] for b, n in enumerate(LENGTHS)])  # (B, 3): per-aspect head outputs
    torch.testing.assert_close(out.aspect_scores, aspects, **F64)
    # score = 0.5 a0 - a1 + 2 a2
    torch.testing.assert_close(out.scores, 0.5 * aspects[:, 0] - aspects[:, 1] + 2.0 * aspects[:, 2], **F64)
    assert out.aspect_token_scores.shape == (4, ids.shape[1], 3)
    # default weights: 1/K each
    assert RewardModel.from_backbone(sft_dir, num_aspects=4).aspect_weights.tolist() == [0.25] * 4


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_encoder_pooling_matches_hand_computation_and_round_trips(bert_dir, make_batch, to_left, pooling, tmp_path):
    rm = RewardModel.from_backbone(bert_dir, kind="encoder", aggregation=pooling, dtype=torch.float64)
    ids, mask = make_batch(LENGTHS, 128, pad_id=0)
    with torch.no_grad():
        out = rm(ids, mask)
        h = forward_hidden(rm.model, ids, mask)
    w = rm.head.weight[0]
    if pooling == "cls":  # the first token's hidden state through the head
        expected = h[:, 0] @ w
    else:  # mean over the real tokens of the head outputs (= head of the mean hidden state)
        expected = torch.stack([(h[b, :n] @ w).mean() for b, n in enumerate(LENGTHS)])
    torch.testing.assert_close(out.scores, expected, **F64)
    left_ids, left_mask = to_left(ids, mask, pad_id=0)
    with torch.no_grad():
        torch.testing.assert_close(rm(left_ids, left_mask).scores, out.scores, rtol=0, atol=1e-10)
    rm.save_pretrained(tmp_path)
    meta = json.loads((tmp_path / METADATA_FILE).read_text())
    assert (meta["kind"], meta["pooling"], meta["aggregation"]) == ("encoder", pooling, None)
    back = RewardModel.from_pretrained(tmp_path, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(back(ids, mask).scores, out.scores, rtol=0, atol=0)


def test_head_init_std_is_one_over_sqrt_hidden_plus_one(sft_dir):
    # Exact rule on a large head: 16 x 4095 weights ~ N(0, 1/4096), std 1/64. For n = 65,520 samples the sample
    # std has relative standard error 1/sqrt(2n) = 0.0028; 5 standard errors = 1.4 %.
    torch.manual_seed(0)
    head = nn.Linear(4095, 16, bias=True)
    init_head_(head)
    n = head.weight.numel()
    assert abs(head.weight.std().item() * 64 - 1) < 5 / math.sqrt(2 * n)
    assert abs(head.weight.mean().item()) < 5 * (1 / 64) / math.sqrt(n)  # mean 0 within 5 standard errors
    assert head.bias.abs().max().item() == 0
    # from_backbone applies it: 64 aspects x 32 hidden = 2048 weights, std 1/sqrt(33) = 0.174 (transformers'
    # default would be 0.02); 5 relative standard errors = 5/sqrt(4096) = 7.8 %.
    rm = RewardModel.from_backbone(sft_dir, num_aspects=64)
    weight = rm.model.score.weight
    assert abs(weight.std().item() * math.sqrt(33) - 1) < 5 / math.sqrt(2 * weight.numel())


def test_dropout_is_disabled(sft_dir, bert_dir, make_batch, tokenizer):
    dec = RewardModel.from_backbone(sft_dir)
    enc = RewardModel.from_backbone(bert_dir, kind="encoder")
    assert dec.config.attention_dropout == 0.0  # was 0.1 in the saved config
    assert enc.config.hidden_dropout_prob == 0.0 and enc.config.attention_probs_dropout_prob == 0.0  # were 0.1
    for rm, vocab in ((dec, len(tokenizer)), (enc, 128)):
        assert all(m.p == 0.0 for m in rm.modules() if isinstance(m, nn.Dropout))
        ids, mask = make_batch(LENGTHS, vocab, pad_id=0)
        rm.train()
        with torch.no_grad():
            train_scores = rm(ids, mask).scores
        rm.eval()
        with torch.no_grad():
            torch.testing.assert_close(rm(ids, mask).scores, train_scores, rtol=0, atol=0)


def test_plain_hf_classifier_folder_loads_and_causal_lm_folder_is_refused(sft_dir, tmp_path, make_batch, tokenizer):
    rm = RewardModel.from_backbone(sft_dir)
    rm.model.save_pretrained(tmp_path)  # no rlhfkit.json
    back = RewardModel.from_pretrained(tmp_path)
    assert (back.kind, back.aggregation, back.aspect_names) == ("decoder", "last", ["score"])
    ids, mask = make_batch(LENGTHS, len(tokenizer), pad_id=0)
    with torch.no_grad():
        torch.testing.assert_close(back(ids, mask).scores, rm(ids, mask).scores, rtol=0, atol=0)
    with pytest.raises(RlhfkitError, match="from_backbone"):
        RewardModel.from_pretrained(sft_dir)


def test_a_foreign_folder_reads_the_last_non_pad_token_as_transformers_does(sft_dir, tokenizer, tmp_path):
    torch.manual_seed(0)
    rm = RewardModel.from_backbone(sft_dir)
    rm.model.config.pad_token_id = tokenizer.eos_token_id  # as TRL's RewardTrainer saves it: pad == EOS
    rm.model.save_pretrained(tmp_path)  # no rlhfkit.json: another trainer's folder
    foreign = RewardModel.from_pretrained(tmp_path)
    assert foreign.convention == "hf" and rm.convention == "rlhfkit"
    eos = tokenizer.eos_token_id
    rows = [tokenizer("Hello there")["input_ids"] + [eos], tokenizer("A longer answer, really")["input_ids"] + [eos],
            tokenizer("two EOS")["input_ids"] + [eos, eos], [eos, eos]]  # the last row: all pad ids
    L = max(map(len, rows))
    ids = torch.tensor([r + [eos] * (L - len(r)) for r in rows])  # right-padded with EOS, as TRL's collator pads
    mask = torch.tensor([[True] * len(r) + [False] * (L - len(r)) for r in rows])
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        with linear_terms(foreign._head()) as terms:
            ours = foreign(ids, mask)
        own_rule = rm(ids, mask)
        theirs = hf(input_ids=ids, attention_mask=mask.long()).logits[:, 0]
    # HF's own forward (its masks and kernels): float32 through the 2 decoder layers, relative to each row's terms
    assert_close_f32(ours.scores, theirs, terms[0].flatten(1).amax(1), forward_factor(2), "hf")
    for i, n_eos in enumerate([1, 1, 2]):  # the token before the trailing EOS ids; position 0 for an all-pad row
        assert ours.scores[i] == ours.token_scores[i, len(rows[i]) - n_eos - 1]
    assert ours.scores[3] == ours.token_scores[3, 0]
    assert (own_rule.scores[:3] - ours.scores[:3]).abs().min() > 1e-4  # rlhfkit's own rule reads the EOS
    with pytest.raises(RlhfkitError, match="'hf' convention reads the last non-pad token"):
        RewardModel(foreign.model, "decoder", "mean", ["score"], [1.0], convention="hf")


def test_critic_values_from_reward_model_folder_or_causal_lm(sft_dir, tokenizer, tmp_path, make_batch):
    rm = RewardModel.from_backbone(sft_dir)
    rm.save_pretrained(tmp_path, tokenizer=tokenizer)
    ids, mask = make_batch(LENGTHS, len(tokenizer), pad_id=0)
    critic = load_critic(tmp_path, tokenizer=tokenizer)  # the policy's tokenizer: it reads the policy's ids
    with torch.no_grad():
        torch.testing.assert_close(critic(ids, mask).token_scores, rm(ids, mask).token_scores, rtol=0, atol=0)
    fresh = load_critic(sft_dir)  # causal LM: new head
    assert fresh.num_aspects == 1 and fresh.kind == "decoder"
    # a mean-aggregation RM (which needs a response mask for its scores) still serves as a critic: same values
    mean_rm = RewardModel.from_backbone(sft_dir, aggregation="mean")
    mean_rm.save_pretrained(tmp_path / "mean", tokenizer=tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(load_critic(tmp_path / "mean")(ids, mask).token_scores,
                                   mean_rm(ids, mask, mask).token_scores, rtol=0, atol=0)
    with torch.no_grad():
        values = fresh(ids, mask).token_scores
    assert values.shape == ids.shape and not torch.equal(values, rm(ids, mask).token_scores)


def test_a_new_value_head_is_zero_and_reward_heads_stay_random(sft_dir, tokenizer, make_batch):
    # lm-human-preferences' value head starts at 0 (scale=0): every value is exactly 0 at the first forward, and
    # the head still gets a gradient (the hidden states), so the critic learns from there
    torch.manual_seed(0)
    critic = load_critic(sft_dir, tokenizer=tokenizer)
    assert not critic.model.score.weight.any()
    ids, mask = make_batch(LENGTHS, len(tokenizer), pad_id=0)
    values = critic(ids, mask).token_scores
    assert torch.equal(values, torch.zeros_like(values))
    values.square().add(values).sum().backward()  # d/dv (v^2 + v) = 1 at v = 0
    assert critic.model.score.weight.grad.abs().sum() > 0
    # the reward head of `rm train` (and a ranker's) keeps its random N(0, 1/(H+1)) start
    head = RewardModel.from_backbone(sft_dir).model.score.weight
    assert head.abs().min() > 0 and 0.5 < head.std().item() * math.sqrt(33) < 1.5
    with pytest.raises(RlhfkitError, match="head initialisation"):
        RewardModel.from_backbone(sft_dir, head_init="uniform")


def _word_tokenizer(n_words: int):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{f"w{i}": i for i in range(3, 3 + n_words)}}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def test_critic_refuses_a_reward_model_that_cannot_read_the_policys_ids(sft_dir, bert_dir, llama_config, tokenizer,
                                                                       tmp_path):
    from transformers import LlamaForCausalLM

    from rlhfkit.models.reward import critic_problem

    # another vocabulary (a word-level tokenizer of 40 tokens vs SmolLM2's 49,152)
    small_tok = _word_tokenizer(37)
    config = copy.deepcopy(llama_config)
    config.vocab_size = len(small_tok)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "small_lm")
    RewardModel.from_backbone(tmp_path / "small_lm", tokenizer=small_tok).save_pretrained(tmp_path / "small", small_tok)
    # the policy's own backbone, saved without tokenizer files: nothing shows which ids it reads
    RewardModel.from_backbone(sft_dir).save_pretrained(tmp_path / "bare")
    RewardModel.from_backbone(bert_dir, kind="encoder").save_pretrained(tmp_path / "encoder", tokenizer=tokenizer)
    cases = {"small": "40 tokens", "bare": "no tokenizer files", "encoder": "encoder"}
    for name, reason in cases.items():
        folder = tmp_path / name
        assert reason in critic_problem(folder, tokenizer)
        with pytest.raises(RlhfkitError, match=f"{folder}.*{reason}.*critic_init=policy"):
            load_critic(folder, tokenizer=tokenizer)
    # the same folders pass with their own tokenizer (or, without one to compare, on their kind alone)
    assert critic_problem(tmp_path / "small", small_tok) is None
    assert load_critic(tmp_path / "bare").kind == "decoder"
    with pytest.raises(RlhfkitError, match="encoder"):
        load_critic(tmp_path / "encoder")
