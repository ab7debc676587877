"""The PairRM-style ranker: input format, truncation, shapes, A/B order, save/load."""

from __future__ import annotations

import json

import pytest
import torch
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
    p_ab = ranker.prob_a_better(PROMPT, A, B)
    p_ba = ranker.prob_a_better(PROMPT, B, A)
    assert isinstance(p_ab, float) and 0 < p_ab < 1
    assert p_ab + p_ba == pytest.approx(1.0, abs=1e-6)
    # the non-symmetric probability is sigmoid of the single logit
    ids, mask = ranker.collate([ranker.build_input(PROMPT, A, B)])
    with torch.no_grad():
        logit = ranker(ids, mask)[0]
    assert ranker.prob_a_better(PROMPT, A, B, symmetric=False) == pytest.approx(torch.sigmoid(logit).item(), abs=1e-7)
    batch = ranker.prob_a_better([PROMPT, "Hi"], [A, "Hello!"], [B, "Go away."])
    assert batch.shape == (2,) and batch[0].item() == pytest.approx(p_ab, abs=1e-6)


def test_save_and_load(ranker, tmp_path, tokenizer):
    ranker.save_pretrained(tmp_path)
    meta = json.loads((tmp_path / METADATA_FILE).read_text())
    assert meta["kind"] == "pairrm" and meta["input_format"] == INPUT_FORMAT and meta["aggregation"] == "last"
    back = PairRanker.from_pretrained(tmp_path)
    seqs = [ranker.build_input(PROMPT, A, B), ranker.build_input("Hi", "Hello!", "Go away.")]
    ids, mask = ranker.collate(seqs)
    assert ids[1, -1] == 0 and not mask[1, -1] and mask[0, -1]  # short row padded with the reward pad id (unk)
    with torch.no_grad():
        expected = ranker(ids, mask)
        torch.testing.assert_close(back(ids, mask), expected, rtol=0, atol=0)
        hf = AutoModelForSequenceClassification.from_pretrained(tmp_path)
        torch.testing.assert_close(hf(input_ids=ids, attention_mask=mask.long()).logits[:, 0], expected,
                                   rtol=0, atol=1e-6)
    assert back.build_input(PROMPT, A, B) == seqs[0]  # the saved tokenizer gives the same ids
    with pytest.raises(RlhfkitError, match="PairRanker"):
        RewardModel.from_pretrained(tmp_path)


def test_a_reward_model_folder_is_not_a_ranker(sft_dir, tmp_path):
    RewardModel.from_backbone(sft_dir).save_pretrained(tmp_path)
    with pytest.raises(RlhfkitError, match="pairrm"):
        PairRanker.from_pretrained(tmp_path)
