"""Rendering, tokenising with over-long policies, padding and collation (SmolLM2 tokenizer: pad == EOS)."""

from __future__ import annotations

import copy

import paths
import pytest
import torch

from rlhfkit.data import (
    PointwiseExample,
    PreferenceExample,
    TokenizedPair,
    TokenizedPoint,
    TokenizeReport,
    collate_pairs,
    collate_points,
    encode_for_rm,
    encode_prompt,
    encode_response,
    left_pad,
    load_preferences,
    render,
    render_prompt,
    render_response,
    right_pad,
    tokenize_pointwise,
    tokenize_preferences,
    tokenize_prompts,
)
from rlhfkit.errors import RlhfkitError

TOKENIZER_DIR = paths.TOKENIZER_DIR
HH_PATH = paths.HH_PATH
SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
USER = {"role": "user", "content": "Hi"}
# One token per word in this tokenizer (checked in test_word_tokens): prompt 8, chosen 2 (+EOS), rejected 1 (+EOS).
PROMPT, CHOSEN, REJECTED = "one two three four five six seven eight", " nine ten", " eleven"


@pytest.fixture(scope="module")
def tok():
    transformers = pytest.importorskip("transformers")
    if not TOKENIZER_DIR.exists():
        pytest.skip("SmolLM2 tokenizer files not present")
    return transformers.AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_word_tokens(tok):
    assert tok.pad_token_id == tok.eos_token_id == 2 and tok.bos_token_id == 1
    assert len(ids(tok, PROMPT)) == 8 and len(ids(tok, CHOSEN)) == 2 and len(ids(tok, REJECTED)) == 1


# ---- rendering -----------------------------------------------------------------------------------------

def test_render_prompt(tok):
    assert render_prompt(tok, "plain text\n") == "plain text\n"
    assert render_prompt(tok, [USER]) == SYSTEM + "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_render_response_takes_the_template_turn_up_to_eos(tok):
    answer = [{"role": "assistant", "content": "Yo there"}]
    assert render_response(tok, " plain") == " plain"
    assert render_response(tok, answer, [USER]) == "Yo there<|im_end|>"
    assert render_response(tok, answer) == "Yo there<|im_end|>"  # placeholder context
    # prompt + response rendered separately == the template's whole conversation, minus the final "\n"
    whole = tok.apply_chat_template([USER] + answer, tokenize=False)
    assert render(tok, [USER], answer) + "\n" == whole
    # the EOS written by the template is not doubled
    assert encode_response(tok, answer, [USER]) == ids(tok, "Yo there") + [2]


def test_render_response_other_templates(tok):
    t = copy.deepcopy(tok)
    # no EOS in the turn: the turn text with trailing whitespace stripped
    t.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                       "{% if add_generation_prompt %}assistant:{% endif %}")
    assert render_response(t, [{"role": "assistant", "content": "Yo"}], [USER]) == " Yo"
    # generation prompt differs from the rendered assistant turn: fall back to the contents
    t.chat_template = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                       "{% if add_generation_prompt %}<reply>{% endif %}")
    two = [{"role": "assistant", "content": "A"}, {"role": "assistant", "content": "B"}]
    assert render_response(t, two, [USER]) == "A\nB"
    t.chat_template = None
    with pytest.raises(RlhfkitError, match="needs a tokenizer with a chat template"):
        render_prompt(t, [USER])


def test_encode_prompt_and_response(tok):
    assert encode_prompt(tok, PROMPT) == ids(tok, PROMPT)  # SmolLM2 adds no BOS to plain text
    chat = encode_prompt(tok, [USER])
    assert chat[0] == tok.bos_token_id and chat.count(tok.bos_token_id) == 3  # system, user, assistant turns
    assert encode_response(tok, CHOSEN) == ids(tok, CHOSEN) + [2]
    assert encode_response(tok, CHOSEN, append_eos=False) == ids(tok, CHOSEN)
    assert encode_response(tok, "done<|im_end|>") == ids(tok, "done") + [2]  # already ends with EOS


# ---- the rendering rule of reward-model inputs -----------------------------------------------------------

def test_encode_for_rm_rlhfkit_tokenises_apart_and_ends_a_complete_response_with_eos(tok):
    assert encode_for_rm(tok, PROMPT, CHOSEN) == (ids(tok, PROMPT), ids(tok, CHOSEN) + [2])
    assert encode_for_rm(tok, PROMPT, CHOSEN, ended=False) == (ids(tok, PROMPT), ids(tok, CHOSEN))
    answer = [{"role": "assistant", "content": "Yo there"}]
    assert encode_for_rm(tok, [USER], answer) == (encode_prompt(tok, [USER]), encode_response(tok, answer, [USER]))
    with pytest.raises(RlhfkitError, match="unknown reward-model convention 'trl'"):
        encode_for_rm(tok, PROMPT, CHOSEN, convention="trl")


def test_encode_for_rm_hf_is_trl_rewardtrainers_text_tokenised_as_one_string(tok):
    # text rows: TRL 1.9 appends the EOS text to prompt + response and tokenises the whole string
    p, r = encode_for_rm(tok, PROMPT, CHOSEN, convention="hf")
    assert p + r == tok(PROMPT + CHOSEN + "<|im_end|>")["input_ids"] and p == ids(tok, PROMPT)
    assert sum(encode_for_rm(tok, PROMPT, CHOSEN, ended=False, convention="hf"), []) == ids(tok, PROMPT + CHOSEN)
    assert sum(encode_for_rm(tok, PROMPT, "done<|im_end|>", convention="hf"), []) == ids(tok, PROMPT + "done") + [2]
    # tokens that merge across the boundary: the prompt part is the common beginning, the joint ids are kept
    p, r = encode_for_rm(tok, "Hello wor", "ld", ended=False, convention="hf")
    assert ids(tok, "Hello wor") != ids(tok, "Hello world")[:2]
    assert p + r == ids(tok, "Hello world") and p == ids(tok, "Hello")
    # conversations: the template of the whole conversation, as TRL's apply_chat_template(tokenize=True) gives it
    answer = [{"role": "assistant", "content": "Yo there"}]
    p, r = encode_for_rm(tok, [USER], answer, convention="hf")
    assert p + r == tok.apply_chat_template([USER] + answer, tokenize=True, return_dict=True)["input_ids"]
    assert p == encode_prompt(tok, [USER]) and r[-2:] == [2] + ids(tok, "\n")  # the template's "\n" after EOS
    # pairs share the prompt ids both sides begin with
    pair = PreferenceExample("The cat", "s sat", " ran", row=1)
    (item,), _ = tokenize_preferences(tok, [pair], 64, convention="hf")
    assert item.chosen_ids == ids(tok, "The cats sat<|im_end|>") and item.rejected_ids == ids(tok, "The cat ran") + [2]
    assert item.chosen_prompt_len == item.rejected_prompt_len == 1


# ---- over-long policies --------------------------------------------------------------------------------

def example(margin=None):
    return PreferenceExample(PROMPT, CHOSEN, REJECTED, margin, row=5)


def test_pairs_fit_without_truncation(tok):
    pairs, report = tokenize_preferences(tok, [example(0.5)], max_length=11)
    p = ids(tok, PROMPT)
    assert pairs == [TokenizedPair(p + ids(tok, CHOSEN) + [2], p + ids(tok, REJECTED) + [2], 8, 8, 0.5, 5)]
    assert report == TokenizeReport(1, 0, 0, 11, "truncate_prompt_left", ())


def test_truncate_prompt_left_keeps_prompt_end_and_whole_responses(tok):
    p = ids(tok, PROMPT)
    # longest response: 2 + EOS = 3 tokens, so max_length 7 leaves 4 prompt tokens: "five six seven eight"
    (pair,), report = tokenize_preferences(tok, [example()], max_length=7)
    assert pair.chosen_ids == p[4:] + ids(tok, CHOSEN) + [2]
    assert pair.rejected_ids == p[4:] + ids(tok, REJECTED) + [2]
    assert tok.decode(pair.chosen_ids[: pair.chosen_prompt_len]) == " five six seven eight"
    assert (pair.chosen_prompt_len, pair.rejected_prompt_len) == (4, 4)
    assert (report.n_in, report.n_truncated, report.n_dropped) == (1, 1, 0)
    # max_length 3: an empty prompt still fits; max_length 2: not even that, so dropped and counted
    (pair,), _ = tokenize_preferences(tok, [example()], max_length=3)
    assert pair.chosen_ids == ids(tok, CHOSEN) + [2] and pair.chosen_prompt_len == 0
    pairs, report = tokenize_preferences(tok, [example()], max_length=2)
    assert pairs == [] and (report.n_truncated, report.n_dropped, report.dropped_rows) == (0, 1, (5,))


def test_truncate_prompt_left_keeps_bos(tok):
    chat = [{"role": "user", "content": PROMPT}]
    full = encode_prompt(tok, chat)
    (pair,), report = tokenize_preferences(tok, [PreferenceExample(chat, CHOSEN, REJECTED)], max_length=10)
    assert pair.chosen_prompt_len == 7 and report.n_truncated == 1
    assert pair.chosen_ids[:7] == [tok.bos_token_id] + full[-6:]  # BOS, then the last 10 - 3 - 1 prompt tokens


def test_drop_and_fail_policies(tok):
    short = PreferenceExample("one", CHOSEN, REJECTED, row=9)
    pairs, report = tokenize_preferences(tok, [example(), short], max_length=7, overlong="drop")
    assert [p.row for p in pairs] == [9] and (report.n_in, report.n_truncated, report.n_dropped) == (2, 0, 1)
    assert report.describe() == ("tokenized 2 examples (max_length=7, overlong='drop'): 1 kept, 0 with the prompt "
                                 "truncated on the left, 1 dropped as too long (row 5)")
    with pytest.raises(RlhfkitError, match=r"^row 5: too long: 8 prompt \+ 3 response tokens > max_length 7"):
        tokenize_preferences(tok, [example()], max_length=7, overlong="fail")
    with pytest.raises(RlhfkitError, match="unknown overlong policy 'cut'"):
        tokenize_preferences(tok, [example()], max_length=7, overlong="cut")


def test_tokenize_pointwise(tok):
    examples = [PointwiseExample(PROMPT, CHOSEN, scores={"a": 1.5, "b": None}, row=1),
                PointwiseExample("one", REJECTED, scores={"a": None, "b": -2.0}, row=2)]
    points, report = tokenize_pointwise(tok, examples, max_length=5)
    assert points[0] == TokenizedPoint(ids(tok, PROMPT)[-2:] + ids(tok, CHOSEN) + [2], 2, None, None,
                                       (1.5, 0.0), (True, False), 1)
    assert points[1].input_ids == ids(tok, "one") + ids(tok, REJECTED) + [2]
    assert (report.n_truncated, report.n_dropped) == (1, 0)
    batch = collate_points(points, pad_id=2)
    assert torch.equal(batch["scores"], torch.tensor([[1.5, 0.0], [0.0, -2.0]]))
    assert torch.equal(batch["scores_mask"], torch.tensor([[True, False], [False, True]]))
    assert torch.equal(batch["response_mask"], torch.tensor([[False, False, True, True, True],
                                                             [False, True, True, False, False]]))


def test_tokenize_prompts(tok):
    prompts, report = tokenize_prompts(tok, [PROMPT, "one two"], max_prompt_length=3)
    assert prompts == [ids(tok, PROMPT)[-3:], ids(tok, "one two")]
    assert (report.n_in, report.n_truncated, report.n_dropped) == (2, 1, 0)
    prompts, report = tokenize_prompts(tok, [PROMPT, "one two"], max_prompt_length=3, overlong="drop")
    assert prompts == [ids(tok, "one two")] and report.dropped_rows == (1,)


@pytest.mark.skipif(not HH_PATH.exists(), reason="shared HH file not present")
def test_real_hh_boundary_is_exact(tok):
    examples = load_preferences(HH_PATH, skip_invalid=True)[:20]
    pairs, report = tokenize_preferences(tok, examples, max_length=4096)
    assert report.n_truncated == report.n_dropped == 0
    for ex, pair in zip(examples, pairs):
        assert tok.decode(pair.chosen_ids[: pair.chosen_prompt_len]) == ex.prompt
        assert tok.decode(pair.chosen_ids[pair.chosen_prompt_len:]) == ex.chosen + "<|im_end|>"
        assert tok.decode(pair.rejected_ids[pair.rejected_prompt_len:]) == ex.rejected + "<|im_end|>"


# ---- padding and collation -----------------------------------------------------------------------------

def test_right_and_left_pad():
    ids_, mask = right_pad([[5, 6, 7], [8]], pad_id=0)
    assert torch.equal(ids_, torch.tensor([[5, 6, 7], [8, 0, 0]]))
    assert torch.equal(mask, torch.tensor([[True, True, True], [True, False, False]]))
    ids_, mask = left_pad([[5, 6, 7], [8], []], pad_id=0)
    assert torch.equal(ids_, torch.tensor([[5, 6, 7], [0, 0, 8], [0, 0, 0]]))
    assert torch.equal(mask, torch.tensor([[True, True, True], [False, False, True], [False, False, False]]))
    assert mask.dtype == torch.bool


def test_collate_pairs_by_hand():
    batch = [TokenizedPair([1, 2, 3, 4], [1, 2, 5], 2, 2, 1.0, 1),
             TokenizedPair([7, 8], [7, 8, 9, 9, 9], 1, 1, -0.5, 2)]
    out = collate_pairs(batch, pad_id=0)
    assert torch.equal(out["input_ids"], torch.tensor([[1, 2, 3, 4, 0], [7, 8, 0, 0, 0],     # chosen rows
                                                       [1, 2, 5, 0, 0], [7, 8, 9, 9, 9]]))  # rejected rows
    assert torch.equal(out["attention_mask"].long(), torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0],
                                                                   [1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]))
    assert torch.equal(out["response_mask"].long(), torch.tensor([[0, 0, 1, 1, 0], [0, 1, 0, 0, 0],
                                                                  [0, 0, 1, 0, 0], [0, 1, 1, 1, 1]]))
    assert torch.equal(out["margin"], torch.tensor([1.0, -0.5]))
    assert torch.equal(out["first_diff"], torch.tensor([2, 2]))  # 3 vs 5 at index 2; [7,8] is a prefix: min len 2
    assert collate_pairs([TokenizedPair([1], [2], 0, 0, None, 1)], 0)["margin"] is None


def test_pad_equal_to_eos_masks_from_lengths(tok):
    eos = tok.eos_token_id
    (pair,), _ = tokenize_preferences(tok, [PreferenceExample("one", " two", " three four five six")], 64)
    out = collate_pairs([pair], pad_id=tok.pad_token_id)
    chosen_len = len(pair.chosen_ids)
    row = out["input_ids"][0]
    assert row[chosen_len - 1] == eos and (row[chosen_len:] == eos).all()  # the EOS and the pads look alike
    assert out["attention_mask"][0, chosen_len - 1] and not out["attention_mask"][0, chosen_len:].any()
    assert out["response_mask"][0, chosen_len - 1] and not out["response_mask"][0, chosen_len:].any()
    assert out["response_mask"][0].sum() == chosen_len - pair.chosen_prompt_len  # " two" + EOS
    assert out["attention_mask"][1].all() and out["input_ids"][1, -1] == eos


def test_collate_points_labels_and_scores():
    points = [TokenizedPoint([3, 4, 2], 1, 1, None, None, None, 1), TokenizedPoint([5, 2], 1, 0, None, None, None, 2)]
    out = collate_points(points, pad_id=2)
    assert torch.equal(out["labels"], torch.tensor([1, 0]))
    assert torch.equal(out["attention_mask"], torch.tensor([[True, True, True], [True, True, False]]))
    points = [TokenizedPoint([3, 4], 1, None, 0.25, None, None, 1)]
    assert torch.equal(collate_points(points, pad_id=2)["scores"], torch.tensor([0.25]))
