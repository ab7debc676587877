"""Tests of rlhfkit.rollout.scoring: reward-model scoring by ids and by text, plain HF classifier folders,
normalisation, function rewards (happy and error paths), weighted combination and load_reward."""

from __future__ import annotations

import math
from pathlib import Path

import paths
import pytest
import torch
from tolerances import assert_close_f32, forward_factor, linear_terms
from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

from rlhfkit.errors import RlhfkitError
from rlhfkit.models.loading import same_vocabulary
from rlhfkit.models.reward import RewardModel, reward_pad_token_id
from rlhfkit.rollout.scoring import (
    CombinedReward,
    FunctionReward,
    RMReward,
    check_scores,
    load_reward,
)

TOKENIZER_DIR = str(paths.TOKENIZER_DIR)
REPO_ROOT = Path(__file__).resolve().parents[2]
PROMPTS = [[{"role": "user", "content": "Say something nice."}],
           [{"role": "user", "content": "How was the film? Answer in a few words please."}],
           [{"role": "user", "content": "Hi"}]]
RESPONSES = ["What a good day, good friends.", "Bad.", "good good good and then some more words"]
STOPPED = [True, False, True]  # rows that end with EOS


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(TOKENIZER_DIR)


def tiny_reward_model(tokenizer, seed: int = 0) -> RewardModel:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, initializer_range=0.3, num_labels=1,
                         pad_token_id=reward_pad_token_id(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    return RewardModel(LlamaForSequenceClassification(config).eval(), "decoder", "last", ["score"], [1.0])


@pytest.fixture(scope="module")
def rm_dir(tokenizer, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("rm")
    tiny_reward_model(tokenizer).save_pretrained(folder, tokenizer)
    return folder


def policy_batch(tokenizer):
    """What the trainer hands to a source: left-padded query ids, right-padded response ids (pad = EOS, as for
    SmolLM2), and the texts decoded from the real ids with the special tokens kept."""
    eos = tokenizer.eos_token_id
    queries = [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False) for p in PROMPTS]
    q_rows = [tokenizer(q, add_special_tokens=False)["input_ids"] for q in queries]
    r_rows = [tokenizer(r, add_special_tokens=False)["input_ids"] + ([eos] if s else [])
              for r, s in zip(RESPONSES, STOPPED)]
    P, T = max(map(len, q_rows)), max(map(len, r_rows)) + 2  # two all-pad response columns
    q_ids = torch.tensor([[eos] * (P - len(q)) + q for q in q_rows])
    q_mask = torch.tensor([[False] * (P - len(q)) + [True] * len(q) for q in q_rows])
    r_ids = torch.tensor([r + [eos] * (T - len(r)) for r in r_rows])
    r_mask = torch.tensor([[True] * len(r) + [False] * (T - len(r)) for r in r_rows])
    prompts = [tokenizer.decode(q) for q in q_rows]
    responses = [tokenizer.decode(r) for r in r_rows]
    return prompts, responses, q_ids, q_mask, r_ids, r_mask, torch.tensor(STOPPED), q_rows, r_rows


# ---------------------------------------------------------------------------------------------- RMReward
def test_id_path_scores_each_row_as_its_unpadded_concatenation(tokenizer, rm_dir):
    prompts, responses, q_ids, q_mask, r_ids, r_mask, stopped, q_rows, r_rows = policy_batch(tokenizer)
    source = RMReward(rm_dir, tokenizer, batch_size=2)
    assert source.use_ids and source.pad_id == 0
    scores = source(prompts, responses, q_ids, q_mask, r_ids, r_mask, stopped)
    assert scores.shape == (3,) and scores.dtype == torch.float32 and scores.device.type == "cpu"
    rm = RewardModel.from_pretrained(rm_dir)
    with torch.no_grad(), linear_terms(rm._head()) as terms:
        for b in range(3):
            ids = torch.tensor([q_rows[b] + r_rows[b]])  # one row alone, no padding anywhere
            alone = rm(ids, torch.ones_like(ids, dtype=torch.bool)).scores[0]
            # float32 through the 2 decoder layers in another batch shape, relative to the head's terms
            assert_close_f32(scores[b], alone, terms[-1].max(), forward_factor(2), f"row {b}")
    assert len(set(scores.tolist())) == 3
    assert not scores.is_inference()  # the trainer may modify the scores in place (e.g. a missing-stop penalty)
    # micro-batching does not change the scores (beyond rounding, as above)
    assert_close_f32(RMReward(rm_dir, tokenizer, batch_size=16)(prompts, responses, q_ids, q_mask, r_ids, r_mask,
                                                                stopped),
                     scores, max(t.max() for t in terms), forward_factor(2), "batch_size 16 vs 2")


def test_text_path_equals_id_path_for_the_same_tokenizer(tokenizer, rm_dir):
    prompts, responses, *ids, q_rows, r_rows = policy_batch(tokenizer)
    by_ids = RMReward(rm_dir, tokenizer)
    by_text = RMReward(rm_dir, tokenizer, force_text=True)
    assert not by_text.use_ids
    # the rebuilt token rows are exactly the sampled ones
    assert by_text.rows(prompts, responses, *ids) == list(zip(q_rows, r_rows))
    torch.testing.assert_close(by_text(prompts, responses, *ids), by_ids(prompts, responses, *ids), rtol=0, atol=0)
    # texts decoded without special tokens: the EOS of stopped rows is restored from the ids
    plain = [tokenizer.decode(r, skip_special_tokens=True) for r in r_rows]
    assert plain[0] != responses[0]
    assert by_text.rows(prompts, plain, *ids) == list(zip(q_rows, r_rows))


def test_a_different_vocabulary_selects_the_text_path(tokenizer, rm_dir):
    policy_tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    policy_tokenizer.add_tokens(["<extra_policy_token>"])
    assert not same_vocabulary(policy_tokenizer, tokenizer) and same_vocabulary(tokenizer, tokenizer)
    source = RMReward(rm_dir, policy_tokenizer)
    assert not source.use_ids
    prompts, responses, *ids, q_rows, r_rows = policy_batch(tokenizer)
    assert source.rows(prompts, responses, *ids) == list(zip(q_rows, r_rows))


def test_plain_hf_sequence_classifier_folder(tokenizer, tmp_path):
    model = tiny_reward_model(tokenizer, seed=5).model
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    assert not (tmp_path / "rlhfkit.json").exists()
    prompts, responses, q_ids, q_mask, r_ids, r_mask, stopped, q_rows, r_rows = policy_batch(tokenizer)
    scores = RMReward(tmp_path, tokenizer)(prompts, responses, q_ids, q_mask, r_ids, r_mask, stopped)
    with torch.no_grad(), linear_terms(model.score) as terms:
        for b in range(3):
            ids = torch.tensor([q_rows[b] + r_rows[b]])
            # float32 through the 2 decoder layers in another batch shape, relative to the head's terms
            assert_close_f32(scores[b], model(input_ids=ids).logits[0, 0], terms[-1].max(), forward_factor(2),
                             f"row {b}")


def test_normalization(tokenizer, tmp_path, rm_dir):
    rm = tiny_reward_model(tokenizer)
    rm.set_normalization(mean=0.25, std=2.0)
    rm.save_pretrained(tmp_path, tokenizer)
    batch = policy_batch(tokenizer)[:7]
    raw = RMReward(tmp_path, tokenizer)(*batch)
    normalized = RMReward(tmp_path, tokenizer, normalize=True)(*batch)
    torch.testing.assert_close(normalized, (raw - 0.25) / 2.0, rtol=0, atol=0)  # the same float32 operations
    # a model without statistics cannot be normalised: an error at construction that says how to fit them
    with pytest.raises(RlhfkitError, match="no stored normalisation statistics.*rlhfkit score.*--fit_reference"):
        RMReward(rm_dir, tokenizer, normalize=True)
    with pytest.raises(RlhfkitError, match="reward function 'tests.rollout.rule_rewards:count_token' has no stored"):
        load_reward([str(tmp_path), "tests.rollout.rule_rewards:count_token"], None, tokenizer, normalize=True)


def test_max_length_drops_prompt_tokens_from_the_left(tokenizer, rm_dir):
    prompts, responses, *ids, q_rows, r_rows = policy_batch(tokenizer)
    source = RMReward(rm_dir, tokenizer, max_length=12)
    bos = tokenizer.bos_token_id  # SmolLM2's BOS is <|im_start|>, which starts every chat-template prompt
    rows = source.rows(prompts, responses, *ids)
    assert [len(r) for r in r_rows] == [9, 2, 9] and all(q[0] == bos for q in q_rows)
    for (p, r), q_row, r_row in zip(rows, q_rows, r_rows):
        # the leading BOS is kept, then the last 12 - 1 - len(response) prompt tokens
        assert r == r_row and p == [bos] + q_row[len(q_row) - (11 - len(r_row)):]
    long_response = RMReward(rm_dir, tokenizer, max_length=8).rows(prompts, responses, *ids)[0]
    assert long_response == ([], r_rows[0][-8:])


def test_check_scores_rejects_non_finite_and_wrong_shapes():
    torch.testing.assert_close(check_scores(torch.tensor([1.0, 2.0], dtype=torch.float64), 2, "src"),
                               torch.tensor([1.0, 2.0]), rtol=0, atol=0)
    with pytest.raises(RlhfkitError, match=r"src returned a non-finite score \(inf\) for row 1"):
        check_scores(torch.tensor([0.0, math.inf]), 2, "src")
    with pytest.raises(RlhfkitError, match=r"shape \(2, 1\)"):
        check_scores(torch.zeros(2, 1), 2, "src")
    with pytest.raises(RlhfkitError, match="expected a list"):
        check_scores(None, 2, "src")


# ---------------------------------------------------------------------------------------------- functions
@pytest.fixture
def importable_tests(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO_ROOT))


def test_function_reward_happy_path(importable_tests):
    source = FunctionReward("tests.rollout.rule_rewards:count_token")
    scores = source(["p"] * 3, RESPONSES, None, None, None, None)
    assert scores.dtype == torch.float32
    torch.testing.assert_close(scores, torch.tensor([2.0, 0.0, 3.0]), rtol=0, atol=0)
    lengths = FunctionReward("tests.rollout.rule_rewards:response_length")(["p"] * 3, RESPONSES, *[None] * 5)
    torch.testing.assert_close(lengths, torch.tensor([float(len(r)) for r in RESPONSES]), rtol=0, atol=0)


@pytest.mark.parametrize("spec, message", [
    ("tests.rollout.no_such_module:fn", "cannot import module 'tests.rollout.no_such_module'"),
    ("tests.rollout.rule_rewards:no_such_function", "has no attribute 'no_such_function'"),
    ("tests.rollout.rule_rewards:NOT_A_FUNCTION", "is a int, not a function"),
    ("tests.rollout.rule_rewards", "must be written 'package.module:function'"),
])
def test_function_reward_lookup_errors(importable_tests, spec, message):
    with pytest.raises(RlhfkitError, match=message):
        FunctionReward(spec)


@pytest.mark.parametrize("name, message", [
    ("one_too_few", "returned 2 scores for 3 responses"),
    ("nan_in_second_row", r"non-finite score \(nan\) for row 1"),
    ("text_in_first_row", "returned 'high' for row 0"),
])
def test_function_reward_bad_results_name_the_function(importable_tests, name, message):
    source = FunctionReward(f"tests.rollout.rule_rewards:{name}")
    with pytest.raises(RlhfkitError, match=message) as info:
        source(["p"] * 3, RESPONSES, *[None] * 5)
    assert f"tests.rollout.rule_rewards:{name}" in str(info.value)


# ---------------------------------------------------------------------------------------------- combination
def test_combined_reward_weights_by_hand(importable_tests):
    count = FunctionReward("tests.rollout.rule_rewards:count_token")      # [2, 0, 3]
    length = FunctionReward("tests.rollout.rule_rewards:response_length")  # [30, 4, 39]
    assert [len(r) for r in RESPONSES] == [30, 4, 39]
    combined = CombinedReward([count, length], [0.5, -0.25])
    # 0.5 * [2, 0, 3] - 0.25 * [30, 4, 39] = [1 - 7.5, 0 - 1, 1.5 - 9.75] = [-6.5, -1, -8.25]
    torch.testing.assert_close(combined(["p"] * 3, RESPONSES, *[None] * 5), torch.tensor([-6.5, -1.0, -8.25]),
                               rtol=0, atol=0)
    with pytest.raises(RlhfkitError, match="2 reward weights for 1 reward sources"):
        CombinedReward([count], [1.0, 2.0])
    bad = CombinedReward([count, FunctionReward("tests.rollout.rule_rewards:nan_in_second_row")], [1.0, 1.0])
    with pytest.raises(RlhfkitError, match="nan_in_second_row"):
        bad(["p"] * 3, RESPONSES, *[None] * 5)


def test_load_reward(importable_tests, tokenizer, rm_dir, tmp_path):
    single = load_reward(["tests.rollout.rule_rewards:count_token"], None, tokenizer)
    assert isinstance(single, FunctionReward)
    rm = load_reward([str(rm_dir)], None, tokenizer)
    assert isinstance(rm, RMReward) and rm.use_ids
    both = load_reward(["tests.rollout.rule_rewards:count_token", str(rm_dir)], [2.0, 1.0], tokenizer)
    assert isinstance(both, CombinedReward) and both.weights == [2.0, 1.0]
    batch = policy_batch(tokenizer)[:7]
    # the same batches and the same float32 operations (0 + 2·s1 + s2)
    torch.testing.assert_close(both(*batch), 2.0 * single(*batch) + rm(*batch), rtol=0, atol=0)
    with pytest.raises(RlhfkitError, match="does not exist"):
        load_reward([str(tmp_path / "missing_rm")], None, tokenizer)
    with pytest.raises(RlhfkitError, match="1 reward weights for 2 rewards"):
        load_reward(["tests.rollout.rule_rewards:count_token", str(rm_dir)], [1.0], tokenizer)
    with pytest.raises(RlhfkitError, match="no reward given"):
        load_reward([], None, tokenizer)
    # a path containing ':' that exists is a model folder, not a function
    colon_dir = tmp_path / "rm:v1"
    RewardModel.from_pretrained(rm_dir).save_pretrained(colon_dir, tokenizer)
    assert isinstance(load_reward([str(colon_dir)], None, tokenizer), RMReward)
