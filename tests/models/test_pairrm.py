"""The PairRM-style ranker: input format, truncation, shapes, A/B order, save/load."""

from __future__ import annotations

import json

import pytest
import torch
from tolerances import EPS32, assert_close_f32, assert_within, forward_factor, linear_terms, sum_tolerance
from transformers import AutoModelForSequenceClassification

from rlhfkit.errors import RlhfkitError
from rlhfkit.models.pairrm import INPUT_FORMAT, PairRanker, build_input
from rlhfkit.models.reward import METADATA_FILE, RewardModel

PROMPT, A, B = "What is 2+2?", "It is 4.", "Five, I think."


@pytest.fixture(scope="module")
def ranker(sft_dir):
    torch.manual_seed(0)
    return PairRanker.from_backbone(sft_dir)


def test_input_format_is_the_documented_text(tokenizer):
    ids = build_input(tokenizer, PROMPT, A, B)
    assert tokenizer.decode(ids) == INPUT_FORMAT.format(prompt=PROMPT, a=A, b=B)
    assert tokenizer.decode(ids) == f"<prompt>\n{PROMPT}\n<response A>\n{A}\n<response B>\n{B}\n<verdict>"
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                {"role": "user", "content": "bye"}]
    assert tokenizer.decode(build_input(tokenizer, messages, A, B)).startswith(
        "<prompt>\nuser: hi\nassistant: hello\nuser: bye\n<response A>\n")


def test_swapping_a_and_b_is_a_distinct_input(ranker):
    ab, ba = ranker.build_input(PROMPT, A, B), ranker.build_input(PROMPT, B, A)
    assert ab != ba and sorted(ab) == sorted(ba)  # same tokens, other order
    ids, mask = ranker.collate([ab, ba])
    with torch.no_grad():
        logits = ranker(ids, mask)
    assert logits.shape == (2,) and logits[0] != logits[1]


def test_truncation_keeps_markers_cuts_symmetrically(tokenizer):
    long_prompt = " ".join(f"p{i}" for i in range(200))
    a, b = " ".join(f"a{i}" for i in range(100)), " ".join(f"b{i}" for i in range(100))
    ids = build_input(tokenizer, long_prompt, a, b, max_length=64)
    assert len(ids) <= 64 and len(ids) >= 62  # the equal cap leaves at most 2 tokens of the budget unused
    text = tokenizer.decode(ids)
    assert text.startswith("<prompt>\n") and text.endswith("\n<verdict>")
    assert "p199" in text and "p0 " not in text  # the prompt keeps its end
    assert "\n<response A>\na0 " in text and "\n<response B>\nb0 " in text  # responses keep their beginnings
    n_a = len(tokenizer(text.split("\n<response A>\n")[1].split("\n<response B>\n")[0])["input_ids"])
    n_b = len(tokenizer(text.split("\n<response B>\n")[1].split("\n<verdict>")[0])["input_ids"])
    assert n_a == n_b
    assert build_input(tokenizer, "short", "x", "y", max_length=64) == build_input(tokenizer, "short", "x", "y")
    with pytest.raises(RlhfkitError, match="too short"):
        build_input(tokenizer, long_prompt, a, b, max_length=10)


def test_forward_shape_and_probabilities(ranker):
    with linear_terms(ranker.rm._head()) as terms:
        p_ab = ranker.prob_a_better(PROMPT, A, B)
        p_ba = ranker.prob_a_better(PROMPT, B, A)  # the same two rows in the other order
        batch = ranker.prob_a_better([PROMPT, "Hi"], [A, "Hello!"], [B, "Go away."])  # 4 rows, with padding

    def tolerance(*probs: float) -> float:
        """The rows in other batch positions or shapes: two evaluations of a logit differ by float32 rounding through
        the 2 decoder layers (relative to the head's terms), which moves σ((l_ab - l_ba) / 2) by at most 1/4 of it
        (σ' <= 1/4); each σ itself: exp, add, divide (2 eps of its value)."""
        logit = forward_factor(2) * EPS32 * max(float(t.max()) for t in terms)
        return 0.25 * logit + sum_tolerance(probs, 2)

    assert isinstance(p_ab, float) and 0 < p_ab < 1
    assert_within(p_ab + p_ba, 1.0, tolerance(p_ab, p_ba), "p_ab + p_ba")
    # the non-symmetric probability is sigmoid of the single logit: the same computation, exactly
    ids, mask = ranker.collate([ranker.build_input(PROMPT, A, B)])
    with torch.no_grad():
        logit = ranker(ids, mask)[0]
    assert ranker.prob_a_better(PROMPT, A, B, symmetric=False) == torch.sigmoid(logit).item()
    assert batch.shape == (2,)
    assert_within(batch[0].item(), p_ab, tolerance(p_ab), "batched p_ab")


def test_save_and_load(ranker, tmp_path, tokenizer):
    ranker.save_pretrained(tmp_path)
    meta = json.loads((tmp_path / METADATA_FILE).read_text())
    assert meta["kind"] == "pairrm" and meta["input_format"] == INPUT_FORMAT and meta["aggregation"] == "last"
    back = PairRanker.from_pretrained(tmp_path)
    seqs = [ranker.build_input(PROMPT, A, B), ranker.build_input("Hi", "Hello!", "Go away.")]
    ids, mask = ranker.collate(seqs)
    assert ids[1, -1] == 0 and not mask[1, -1] and mask[0, -1]  # short row padded with the reward pad id (unk)
    with torch.no_grad(), linear_terms(ranker.rm._head()) as terms:
        expected = ranker(ids, mask)
        torch.testing.assert_close(back(ids, mask), expected, rtol=0, atol=0)
        hf = AutoModelForSequenceClassification.from_pretrained(tmp_path)
        # HF's own forward (its masks and kernels): float32 through the 2 decoder layers, relative to the head's terms
        assert_close_f32(hf(input_ids=ids, attention_mask=mask.long()).logits[:, 0], expected, terms[0].max(),
                         forward_factor(2), "hf")
    assert back.build_input(PROMPT, A, B) == seqs[0]  # the saved tokenizer gives the same ids
    with pytest.raises(RlhfkitError, match="PairRanker"):
        RewardModel.from_pretrained(tmp_path)


def test_a_reward_model_folder_is_not_a_ranker(sft_dir, tmp_path):
    RewardModel.from_backbone(sft_dir).save_pretrained(tmp_path)
    with pytest.raises(RlhfkitError, match="pairrm"):
        PairRanker.from_pretrained(tmp_path)
