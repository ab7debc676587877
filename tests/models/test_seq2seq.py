"""The seq2seq (SteamSHP-style) ranker on a tiny T5: input format and caps (hand-checked ids), the answer logits
of the first decoder step, P(A) as the two-way softmax, order-swap antisymmetry, save/load and plain transformers."""

from __future__ import annotations

import json

import pytest
import torch
from seq2seq_helpers import make_t5_folder, make_tokenizer, t5_forward_factor
from tolerances import EPS32, assert_close_f32, assert_within, linear_terms
from transformers import AutoModelForSeq2SeqLM

from rlhfkit.errors import RlhfkitError
from rlhfkit.models.pairrm import PairRanker
from rlhfkit.models.reward import METADATA_FILE, RewardModel
from rlhfkit.models.seq2seq import INPUT_FORMAT, Seq2SeqRanker, answer_token_ids, end_ids

# ids of the helpers' word-level vocabulary: w3..w45 -> 3..45, good 46, bad 47, POST: 48, RESPONSE 49, A: 50,
# B: 51, Which 52, response 53, is 54, better? 55, A 56, B 57; </s> 1
POST, RESPONSE, A_COLON, B_COLON, QUESTION, EOS = [48], [49], [50], [51], [52, 53, 54, 55, 49], [1]


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    return make_t5_folder(tmp_path_factory.mktemp("t5") / "t5")


@pytest.fixture(scope="module")
def ranker(t5_dir):
    return Seq2SeqRanker.from_backbone(t5_dir, max_length=64).eval()


def ids_of(words: str) -> list[int]:
    return [int(w[1:]) for w in words.split()]  # "w10 w11" -> [10, 11]


def test_input_is_the_steamshp_text_with_hand_checked_ids():
    tok = make_tokenizer()
    build = Seq2SeqRanker.input_builder(tok)
    assert end_ids(tok) == EOS  # the tokenizer appends </s>, as T5's does
    ids = build("w3 w4", "w5 good", "w6 bad")
    assert ids == POST + [3, 4] + RESPONSE + A_COLON + [5, 46] + RESPONSE + B_COLON + [6, 47] + QUESTION + EOS
    assert INPUT_FORMAT == ("POST: {prompt}\n\n RESPONSE A: {a}\n\n RESPONSE B: {b}\n\n Which response is better? "
                            "RESPONSE")
    assert tok.decode(ids) == "POST: w3 w4 RESPONSE A: w5 good RESPONSE B: w6 bad Which response is better? " \
                              "RESPONSE </s>"  # (a word-level decode joins with spaces)
    assert answer_token_ids(tok) == (56, 57)


def test_the_length_cap_is_equal_for_both_responses_and_keeps_the_template():
    """Fixed: 10 template ids + </s> = 11; max_length 23 leaves 12 for prompt (10), A (6), B (3): the common cap
    c = 4 (4 + 4 + 3 = 11 <= 12, c = 5 gives 13): the prompt keeps its last 4 ids, A its first 4, B all 3."""
    build = Seq2SeqRanker.input_builder(make_tokenizer())
    prompt = " ".join(f"w{i}" for i in range(10, 20))
    a, b = " ".join(f"w{i}" for i in range(20, 26)), "w30 w31 w32"
    ab = build(prompt, a, b, 23)
    assert ab == (POST + ids_of("w16 w17 w18 w19") + RESPONSE + A_COLON + ids_of("w20 w21 w22 w23") + RESPONSE
                  + B_COLON + ids_of("w30 w31 w32") + QUESTION + EOS)
    ba = build(prompt, b, a, 23)  # the cap is symmetric: the other order holds the same parts
    assert ba == (POST + ids_of("w16 w17 w18 w19") + RESPONSE + A_COLON + ids_of("w30 w31 w32") + RESPONSE
                  + B_COLON + ids_of("w20 w21 w22 w23") + QUESTION + EOS)
    assert build(prompt, a, b, 100) == build(prompt, a, b)  # no cut when it fits
    with pytest.raises(RlhfkitError, match="too short"):
        build(prompt, a, b, 13)  # budget 2: not even one id per part


def test_answers_must_be_distinct_single_tokens():
    class Fake:
        def __init__(self, table):
            self.table = table

        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": self.table[text]}

    with pytest.raises(RlhfkitError, match="'A' as 2 tokens"):
        answer_token_ids(Fake({"A": [5, 6], "B": [7]}))
    with pytest.raises(RlhfkitError, match="same token"):
        answer_token_ids(Fake({"A": [5], "B": [5]}))


def test_logit_is_the_answer_logit_difference_of_the_first_decoder_step(ranker):
    """Against transformers' own generation: the raw logits of the first generated token (from the config's
    decoder start id) give z[A] - z[B] and the two-way softmax P(A) = σ(z[A] - z[B])."""
    assert ranker.model.config.dropout_rate == 0.0 and (ranker.a_id, ranker.b_id) == (56, 57)
    seqs = [ranker.build_input("w3 w4 w5", "w6 good", "w7 bad"), ranker.build_input("w8", "w9 w10 w11", "w12")]
    ids, mask = ranker.collate(seqs)
    assert ids[1, -1] == 0 and not mask[1, -1]  # the shorter row is padded with <pad>
    with torch.no_grad(), linear_terms(ranker.model.lm_head) as terms:
        ours = ranker(ids, mask)
        out = ranker.model.generate(input_ids=ids, attention_mask=mask.long(), max_new_tokens=1, do_sample=False,
                                    output_logits=True, return_dict_in_generate=True)
    z = out.logits[0]  # (B, V): the first decoder step
    scale = terms[0][:, 0, 56] + terms[0][:, 0, 57]  # Σ|terms| of the two answer logits
    assert_close_f32(ours, z[:, 56] - z[:, 57], scale, t5_forward_factor(), "z[A] - z[B]")
    p = ranker.prob_a_better(["w3 w4 w5", "w8"], ["w6 good", "w9 w10 w11"], ["w7 bad", "w12"], symmetric=False)
    two_way = torch.softmax(torch.stack([z[:, 56], z[:, 57]], dim=1).double(), dim=1)[:, 0]
    # σ' <= 1/4 of the logit's rounding (above), plus exp, add, divide (a few eps of p)
    assert_within(p, two_way, 0.25 * t5_forward_factor() * EPS32 * scale + 3 * EPS32 * two_way, "P(A)")


def test_the_symmetric_score_is_antisymmetric_in_the_two_responses(ranker):
    prompts, As, Bs = ["w3 w4", "w5 w6 w7"], ["w8 good", "w9"], ["w10 bad w11", "w12 w13"]
    with torch.no_grad(), linear_terms(ranker.model.lm_head) as terms:
        d_ab = ranker.symmetric_logits(prompts, As, Bs)
        d_ba = ranker.symmetric_logits(prompts, Bs, As)  # the same rows, in other batch positions
    scale = max(float(t[..., 56].max() + t[..., 57].max()) for t in terms)
    assert d_ab.shape == (2,) and (d_ab != 0).all()
    assert_close_f32(d_ba, -d_ab, scale, t5_forward_factor(), "d(B, A) = -d(A, B)")
    p_ab = ranker.prob_a_better(prompts, As, Bs)
    p_ba = ranker.prob_a_better(prompts, Bs, As)
    assert_within(p_ab + p_ba, torch.ones(2), 0.25 * t5_forward_factor() * EPS32 * scale + 4 * EPS32, "P(A>B)+P(B>A)")
    same = ranker.symmetric_logits(["w3"], ["w4 w5"], ["w4 w5"])  # a response against itself: both orders one row
    assert same.item() == 0.0


def test_save_and_load_round_trip_and_plain_transformers(ranker, tmp_path):
    ranker.save_pretrained(tmp_path)
    meta = json.loads((tmp_path / METADATA_FILE).read_text())
    assert meta["kind"] == "seq2seq" and meta["input_format"] == INPUT_FORMAT and meta["max_length"] == 64
    assert meta["answers"] == {"A": 56, "B": 57} and meta["pad_token_id"] == 0
    back = Seq2SeqRanker.from_pretrained(tmp_path)
    assert back.max_length == 64 and back.build_input("w3", "w4", "w5") == ranker.build_input("w3", "w4", "w5")
    ids, mask = ranker.collate([ranker.build_input("w3 w4 w5", "w6 good", "w7 bad"),
                                ranker.build_input("w8", "w9", "w10")])
    hf = AutoModelForSeq2SeqLM.from_pretrained(tmp_path)  # plain transformers, eval mode
    start = torch.zeros((2, 1), dtype=torch.long)
    with torch.no_grad():
        expected = ranker(ids, mask)
        torch.testing.assert_close(back(ids, mask), expected, rtol=0, atol=0)
        z = hf(input_ids=ids, attention_mask=mask.long(), decoder_input_ids=start).logits[:, 0]
    torch.testing.assert_close(z[:, 56] - z[:, 57], expected, rtol=0, atol=0)  # same module, same weights
    with pytest.raises(RlhfkitError, match="'seq2seq' model, not a reward model"):
        RewardModel.from_pretrained(tmp_path)
    with pytest.raises(RlhfkitError, match="not a PairRM ranker folder"):
        PairRanker.from_pretrained(tmp_path)


def test_a_folder_of_another_kind_is_not_a_seq2seq_ranker(tmp_path):
    (tmp_path / METADATA_FILE).write_text(json.dumps({"kind": "pairrm"}))
    with pytest.raises(RlhfkitError, match="not a seq2seq ranker folder"):
        Seq2SeqRanker.from_pretrained(tmp_path)
