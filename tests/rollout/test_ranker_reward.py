"""The ranker reward source: a seq2seq (or PairRM) ranker scores each policy response against its prompt's
reference response, with the symmetric logit; load_reward recognises ranker folders; references reach only the
sources that need them."""

from __future__ import annotations

import pytest
import torch
from seq2seq_helpers import make_t5_folder, make_tokenizer, t5_forward_factor
from tolerances import EPS32, assert_close_f32, linear_terms
from transformers import LlamaConfig, LlamaForCausalLM

from rlhfkit.errors import RlhfkitError
from rlhfkit.models.pairrm import PairRanker
from rlhfkit.models.rankers import load_ranker
from rlhfkit.models.seq2seq import Seq2SeqRanker
from rlhfkit.rollout.scoring import CombinedReward, FunctionReward, RankerReward, call_source, load_reward

PROMPTS = ["w3 w4", "w7", "w3 w4"]
RESPONSES = ["w5 good", "w8 w9", "w6 bad"]
REFERENCES = ["w6 bad", "w8 w9", "w5 good"]  # row 1: the response is its reference; row 2: row 0 swapped


def count_w5(prompts, responses):
    return [float(r.split().count("w5")) for r in responses]


@pytest.fixture(scope="module")
def ranker_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("ranker")
    Seq2SeqRanker.from_backbone(make_t5_folder(root / "t5"), max_length=64).save_pretrained(root / "seq2seq")
    return root / "seq2seq"


def batch(tokenizer):
    """What the PPO trainer hands to a source: left-padded queries that end with the policy's special end id
    (</s>: decoded away for the ranker), right-padded responses, and the texts (prompts with special tokens)."""
    q_rows = [tokenizer(p)["input_ids"] for p in PROMPTS]  # "w3 w4" -> [3, 4, </s>]
    r_rows = [tokenizer(r, add_special_tokens=False)["input_ids"] for r in RESPONSES]
    P, T = max(map(len, q_rows)), max(map(len, r_rows))
    q_ids = torch.tensor([[0] * (P - len(q)) + q for q in q_rows])
    q_mask = torch.tensor([[False] * (P - len(q)) + [True] * len(q) for q in q_rows])
    r_ids = torch.tensor([r + [0] * (T - len(r)) for r in r_rows])
    r_mask = torch.tensor([[True] * len(r) + [False] * (T - len(r)) for r in r_rows])
    prompts = [tokenizer.decode(q) for q in q_rows]
    return prompts, list(RESPONSES), q_ids, q_mask, r_ids, r_mask, torch.ones(3, dtype=torch.bool)


def test_the_score_is_the_symmetric_logit_against_the_reference(ranker_dir):
    tok = make_tokenizer()
    args = batch(tok)
    assert args[0][0] == "w3 w4 </s>"  # the text the trainer passes; the ranker reads the prompt without </s>
    source = load_reward([str(ranker_dir)], None, tok)
    assert isinstance(source, RankerReward) and source.needs_references
    scores = call_source(source, *args, references=REFERENCES)
    assert scores.shape == (3,) and scores.dtype == torch.float32
    ranker = load_ranker(ranker_dir)
    with linear_terms(ranker.model.lm_head) as terms:
        expected = ranker.symmetric_logits(PROMPTS, RESPONSES, REFERENCES)  # one batch, as the source's
    torch.testing.assert_close(scores, expected, rtol=0, atol=0)
    scale = max(float(t[..., 56].max() + t[..., 57].max()) for t in terms)
    # a response as good as its reference scores 0; swapping response and reference negates the score
    assert_close_f32(scores[1], 0.0, scale, t5_forward_factor(), "response == reference")
    assert_close_f32(scores[2], -scores[0], scale, t5_forward_factor(), "swapped")
    assert abs(float(scores[0])) > 100 * t5_forward_factor() * EPS32 * scale  # a preference well above rounding
    small = RankerReward(ranker_dir, tok, batch_size=2)(*args, references=REFERENCES)  # other batch shapes
    assert_close_f32(small, scores, scale, t5_forward_factor(), "batch_size 2")


def test_a_ranker_source_needs_references_and_has_no_normalisation(ranker_dir):
    tok = make_tokenizer()
    source = RankerReward(ranker_dir, tok)
    with pytest.raises(RlhfkitError, match="'reference' field"):
        source(*batch(tok))
    with pytest.raises(RlhfkitError, match="already relative to the prompt's reference"):
        load_reward([str(ranker_dir)], None, tok, normalize=True)


def test_combined_sources_pass_references_only_to_the_ranker(ranker_dir, monkeypatch):
    monkeypatch.syspath_prepend(str(__import__("pathlib").Path(__file__).parent))
    tok = make_tokenizer()
    args = batch(tok)
    combined = load_reward([str(ranker_dir), "test_ranker_reward:count_w5"], [2.0, 0.5], tok)
    assert isinstance(combined, CombinedReward) and combined.needs_references
    assert isinstance(combined.sources[1], FunctionReward) and not getattr(combined.sources[1], "needs_references",
                                                                            False)
    ranked = call_source(combined.sources[0], *args, references=REFERENCES)
    total = call_source(combined, *args, references=REFERENCES)
    torch.testing.assert_close(total, 2.0 * ranked + 0.5 * torch.tensor([1.0, 0.0, 0.0]), rtol=0, atol=0)


def test_a_pairrm_folder_is_a_ranker_source_too(tmp_path):
    """The same rule for a PairRM ranker (a tiny Llama on the same word tokenizer)."""
    tok = make_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, eos_token_id=1,
                         bos_token_id=None)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "lm")
    tok.save_pretrained(tmp_path / "lm")
    PairRanker.from_backbone(tmp_path / "lm", tokenizer=tok, max_length=64).save_pretrained(tmp_path / "pairrm")
    source = load_reward([str(tmp_path / "pairrm")], None, tok)
    assert isinstance(source, RankerReward) and isinstance(source.model, PairRanker)
    scores = call_source(source, *batch(tok), references=REFERENCES)
    expected = source.model.symmetric_logits(PROMPTS, RESPONSES, REFERENCES)
    torch.testing.assert_close(scores, expected, rtol=0, atol=0)
