"""The quickstart on the real SmolLM2-135M model at a tiny scale, so that the real path cannot silently break."""

from __future__ import annotations

import json
import re
import warnings

import pytest

from rlhfkit.cli import main
from rlhfkit.quickstart.report import PLOT_NAMES, REQUIRED_FILES


@pytest.mark.slow
def test_quickstart_tiny_real_model_end_to_end(tmp_path, capsys):
    pytest.importorskip("vaderSentiment")
    out = tmp_path / "run"
    with warnings.catch_warnings(record=True) as caught:  # a quickstart run prints no deprecation warnings
        warnings.simplefilter("always")
        assert main(["quickstart", "--scale", "tiny", "--output", str(out), "--seed", "3"]) == 0
    deprecations = [f"{w.category.__name__}: {w.message} ({w.filename}:{w.lineno})" for w in caught
                    if issubclass(w.category, (DeprecationWarning, PendingDeprecationWarning, FutureWarning))]
    assert deprecations == []
    # the reward model's frozen blocks came from the label sampler's captured states (all but re-tokenised rows)
    used = re.search(r"trunk_cache: (\d+) of (\d+) rows", capsys.readouterr().out)
    assert used is not None and 0 < int(used[1]) <= int(used[2])
    for rel in REQUIRED_FILES:
        assert (out / rel).is_file(), rel
    for name in PLOT_NAMES:
        assert (out / "plots" / name).stat().st_size > 10_000
    summary = json.loads((out / "summary.json").read_text())
    assert 0.0 <= summary["rm_accuracy"] <= 1.0 and 0.0 <= summary["win_rate"] <= 1.0
    assert summary["scale"] == "tiny" and summary["mean_kl"] == summary["mean_kl"]  # finite, not NaN
    assert summary["algorithm"] == "ppo" and summary["peak_rss_mib"] > 100
    rows = [json.loads(line) for line in (out / "metrics/ppo.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and -1.0 <= rows[0]["gold/mean"] <= 1.0
    assert (out / "models/policy/config.json").is_file()
    assert (out / "models/reward_model/rlhfkit.json").is_file()
    assert "win" in (out / "summary.md").read_text().lower()
    # `rlhfkit report DIR` regenerates the same files
    (out / "summary.md").unlink()
    assert main(["report", str(out)]) == 0
    assert (out / "summary.md").is_file()
    # same seed, same numbers: a second run reproduces every headline number and the PPO metrics (timings aside)
    again = tmp_path / "again"
    assert main(["quickstart", "--scale", "tiny", "--output", str(again), "--seed", "3"]) == 0
    # timings and the process's peak memory (the same process ran twice) aside
    untimed = lambda d: {k: v for k, v in d.items() if not k.startswith(("time", "throughput", "peak_"))}  # noqa: E731
    assert untimed(json.loads((again / "summary.json").read_text())) == untimed(summary)
    rows_again = [json.loads(line) for line in (again / "metrics/ppo.jsonl").read_text().splitlines()]
    assert [untimed(r) for r in rows_again] == [untimed(r) for r in rows]
    # --from_run: the labels and reward model of the first run, steps 3-5 only: the same numbers again
    reused = tmp_path / "reused"
    assert main(["quickstart", "--scale", "tiny", "--output", str(reused), "--seed", "3", "--from_run", str(out)]) == 0
    summary_reused = json.loads((reused / "summary.json").read_text())
    assert summary_reused.pop("reused_from") == str(out) and "time_labels_s" not in summary_reused
    assert {k: v for k, v in untimed(summary_reused).items()} == \
        {k: v for k, v in untimed(summary).items()}
    assert (reused / "data/preferences.jsonl").read_bytes() == (out / "data/preferences.jsonl").read_bytes()
    rows_reused = [json.loads(line) for line in (reused / "metrics/ppo.jsonl").read_text().splitlines()]
    assert [untimed(r) for r in rows_reused] == [untimed(r) for r in rows]


def test_quickstart_rejects_contradicting_flags(capsys):
    assert main(["quickstart", "--fast", "--scale", "tiny"]) == 2
    assert "--fast contradicts" in capsys.readouterr().err


def test_the_output_folder_is_replaced_only_when_it_holds_a_quickstart_run(tmp_path):
    from rlhfkit.config import save_config
    from rlhfkit.errors import RlhfkitError
    from rlhfkit.quickstart.pipeline import QuickstartConfig, check_output

    check_output(tmp_path / "new")  # nothing there yet
    (tmp_path / "empty").mkdir()
    check_output(tmp_path / "empty")
    run = tmp_path / "run"
    (run / "data").mkdir(parents=True)
    save_config(QuickstartConfig(output=str(run), scale="tiny"), run / "config.yaml")  # as a previous run left it
    check_output(run)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "config.yaml").write_text("model: my_own\n")  # someone else's config
    with pytest.raises(RlhfkitError, match="does not look like a quickstart run folder"):
        check_output(tmp_path / "mine")


def test_evaluate_policy_kl_is_the_summed_log_ratio_of_the_sampled_tokens(monkeypatch):
    """KL per response = Σ_t (log π − log π_ref) over the response tokens: 0 against the policy itself, and the
    hand sum from one full forward pass of each model against another model."""
    import sys
    from pathlib import Path

    import torch
    from tolerances import assert_within, forward_factor, linear_terms, logprob_tolerance, sum_tolerance
    from transformers import AutoTokenizer

    from rlhfkit.quickstart import pipeline

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "rollout"))
    from test_sampling import TOKENIZER_DIR, full_forward_logprobs, tiny_llama

    tok = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    tok.pad_token = tok.eos_token
    policy, other = tiny_llama(len(tok), seed=0), tiny_llama(len(tok), seed=1)

    class Judge:
        def score(self, texts):
            return [0.0] * len(texts)

    monkeypatch.setattr(pipeline, "_judge", lambda: Judge())
    proxy = lambda prompts, texts, *tensors: torch.zeros(len(texts))  # noqa: E731
    prompts = ["Describe a rainy Monday morning commute.", "Tell me about a garden in early spring."]
    run = lambda ref: pipeline.evaluate_policy(policy, tok, prompts, proxy, 6, 1.0, seed=4, reference=ref)  # noqa: E731
    itself = run(policy)
    rows = run(other)
    # the same draws again (same seed), scored by one full forward pass of each model in float64
    from rlhfkit.data.tokenize import left_pad, tokenize_prompts
    from rlhfkit.rollout.sampling import GenerationConfig, sample

    ids, _ = tokenize_prompts(tok, [pipeline.user_messages(p) for p in prompts], max_prompt_length=256)
    q, qm = left_pad(ids, tok.pad_token_id)
    gen = GenerationConfig(max_new_tokens=6, temperature=1.0, stop_token_ids=(tok.eos_token_id,),
                           pad_token_id=tok.pad_token_id)
    r = sample(policy, q, qm, gen, torch.Generator().manual_seed(4), tokenizer=tok)
    with linear_terms(policy.lm_head) as terms_p, linear_terms(other.lm_head) as terms_o:
        lp_p, lp_o = full_forward_logprobs(policy, r, 1.0), full_forward_logprobs(other, r, 1.0)
    want = ((lp_p - lp_o) * r.response_mask).sum(1)
    assert [row["response_tokens"] for row in rows] == r.response_mask.sum(1).tolist()
    # each float32 log-prob: the 2 decoder layers with or without the KV cache, then the log-softmax over V; the
    # float32 sum of a row's <= 6 log-ratios (3 levels)
    P, T, m = r.query_ids.shape[1], r.response_ids.shape[1], r.response_mask
    tol_p, tol_o = (logprob_tolerance(t[0][:, P - 1:P - 1 + T], lp, 1.0, forward_factor(2))
                    for t, lp in ((terms_p, lp_p), (terms_o, lp_o)))
    summing = torch.tensor([sum_tolerance((lp_p - lp_o)[b][m[b]], 3) for b in range(len(prompts))])
    assert_within([row["kl"] for row in itself], [0.0, 0.0], (tol_p * m).sum(1) + summing, "kl against itself")
    assert_within([row["kl"] for row in rows], want, ((tol_p + tol_o) * m).sum(1) + summing, "kl")
    assert max(abs(k) for k in want.tolist()) > 0.1  # the two models differ: the check has teeth


def test_precision_auto_takes_bf16_only_on_a_gpu_where_it_is_fast(monkeypatch):
    import rlhfkit.utils
    from rlhfkit.quickstart.pipeline import QuickstartConfig, use_bf16

    assert use_bf16("fp32") is False and use_bf16("bf16") is True
    for speed, want in (("fast", True), ("native", False), ("slow", False)):
        monkeypatch.setattr(rlhfkit.utils, "bf16_speed", lambda device, flags=None, s=speed: s)
        assert use_bf16("auto", "cuda") is want
        assert use_bf16("auto", "cpu") is False  # CPUs: bf16 only when asked for (see use_bf16)
        assert use_bf16("fp32", "cuda") is False and use_bf16("bf16", "cpu") is True
    with pytest.raises(Exception, match="precision"):
        QuickstartConfig(precision="fp16")


@pytest.mark.parametrize("scale", ["default", "fast", "tiny"])
@pytest.mark.parametrize("algorithm", ["ppo", "rloo", "grpo", "dr_grpo", "reinforce_pp", "reinforce_pp_baseline",
                                       "remax"])
def test_every_algorithm_samples_the_presets_responses_per_iteration_with_a_valid_ppo_config(algorithm, scale):
    from rlhfkit.quickstart.pipeline import ALGORITHMS, PRESETS, QuickstartConfig, rl_step_config

    assert sorted(ALGORITHMS) == sorted(["ppo", "rloo", "grpo", "dr_grpo", "reinforce_pp", "reinforce_pp_baseline",
                                         "remax"])
    preset = PRESETS[scale]
    # the step-3 config the pipeline runs (PPOConfig validates the combination)
    cfg = rl_step_config(QuickstartConfig(scale=scale, algorithm=algorithm), "sft", "rm", "p.jsonl", "out", False)
    assert cfg.rollout_batch_size * cfg.samples_per_prompt == preset.ppo_batch  # the same responses as PPO
    assert cfg.critic_free == (algorithm != "ppo")
    assert (cfg.critic_freeze_layers == preset.critic_freeze_layers) == (algorithm == "ppo")
    assert cfg.advantage_estimator == ("gae" if algorithm == "ppo" else algorithm)


def test_an_unknown_algorithm_is_refused_naming_the_choices():
    from rlhfkit.errors import RlhfkitError
    from rlhfkit.quickstart.pipeline import QuickstartConfig

    with pytest.raises(RlhfkitError, match="algorithm.*ppo.*rloo"):
        QuickstartConfig(algorithm="a2c")


def test_from_run_refuses_a_folder_that_is_not_a_finished_run_of_the_same_settings(tmp_path):
    import yaml

    from rlhfkit.errors import RlhfkitError
    from rlhfkit.quickstart.pipeline import FROM_RUN_FILES, QuickstartConfig, check_from_run

    src = tmp_path / "earlier"
    cfg = lambda **kw: QuickstartConfig(output=str(tmp_path / "new"), from_run=str(src), **kw)  # noqa: E731
    with pytest.raises(RlhfkitError, match="no such run folder"):
        check_from_run(cfg())
    for rel in FROM_RUN_FILES:  # a finished run's files
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        if rel == "models/reward_model":
            (src / rel).mkdir()
        else:
            (src / rel).write_text("{}")
    saved = {"scale": "default", "seed": 0, "model": "", "label_temperature": 0.1, "precision": "auto"}
    (src / "config.yaml").write_text(yaml.safe_dump(saved))
    (src / "summary.json").write_text(json.dumps({"label_agreement": 0.9, "label_agreement_expected": 0.91}))
    assert check_from_run(cfg())["summary"]["label_agreement"] == 0.9
    with pytest.raises(RlhfkitError, match="seed=0.*seed=1"):
        check_from_run(cfg(seed=1))
    with pytest.raises(RlhfkitError, match="--output"):  # the output folder is replaced: never the source
        check_from_run(QuickstartConfig(output=str(src), from_run=str(src)))
    (src / "rm_eval.json").unlink()
    with pytest.raises(RlhfkitError, match="rm_eval.json is missing"):
        check_from_run(cfg())


def test_evaluation_from_shared_trunks_equals_the_plain_forwards(tmp_path, monkeypatch):
    """`evaluate_policy(share_trunks=True)` on a policy, a reference sharing its block 0 (block 1 differs) and a
    reward model built on the reference (both blocks shared): the sampler keeps block 0's states, the reference
    runs block 1 from them (its block 0 never runs), the reward model only its norm and head; texts and token
    counts are those of the plain forwards, proxy scores and KL to 1e-10 (float64, RMSNorm without its float32
    cast). Without a reference (the SFT evaluation) the reward model shares both of the policy's blocks."""
    import sys
    from pathlib import Path

    import torch
    from tolerances import float64_rms_norm
    from transformers import AutoTokenizer
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from rlhfkit.models.reward import RewardModel
    from rlhfkit.quickstart import pipeline
    from rlhfkit.rollout.scoring import RMReward

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "rollout"))
    from test_sampling import TOKENIZER_DIR, tiny_llama

    monkeypatch.setattr(LlamaRMSNorm, "forward", float64_rms_norm)
    tok = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    tok.pad_token = tok.eos_token
    reference = tiny_llama(len(tok), seed=0, dtype=torch.float64)
    policy = tiny_llama(len(tok), seed=0, dtype=torch.float64)
    with torch.no_grad():  # the policy's block 1 trained away from the reference's
        for p in policy.model.layers[1].parameters():
            p.add_(0.05 * torch.randn_like(p))
        policy.lm_head.weight.add_(0.05 * torch.randn_like(policy.lm_head.weight))
    for model in (reference, policy):  # rotary tables in float32, as a float64 model loaded from a folder has them
        model.model.rotary_emb.float()
    reference.save_pretrained(tmp_path / "ref")
    tok.save_pretrained(tmp_path / "ref")
    torch.manual_seed(0)
    RewardModel.from_backbone(str(tmp_path / "ref"), kind="decoder", aggregation="last").save_pretrained(
        tmp_path / "rm", tokenizer=tok)
    proxy = RMReward(str(tmp_path / "rm"), tok, dtype=torch.float64)
    assert proxy.shareable_depth(reference.model) == 2 and proxy.shareable_depth(policy.model) == 1

    class Judge:
        def score(self, texts):
            return [float(len(t)) for t in texts]

    monkeypatch.setattr(pipeline, "_judge", lambda: Judge())
    ran, trunk_layers = [], []
    reference.model.layers[0].register_forward_hook(lambda *a: ran.append(1))
    forward = proxy._forward
    monkeypatch.setattr(proxy, "_forward", lambda *a, **k: (trunk_layers.append(
        getattr(a[3] if len(a) > 3 else k.get("trunk"), "layers", None)), forward(*a, **k))[1])
    prompts = ["Describe a rainy Monday morning commute.", "Tell me about a garden in early spring.", "Hello"]
    for model, ref, depth in ((policy, reference, 2), (reference, None, 2)):
        rows = {}
        for share in (True, False):
            ran.clear()
            trunk_layers.clear()
            rows[share] = pipeline.evaluate_policy(model, tok, prompts, proxy, 6, 1.0, seed=4, reference=ref,
                                                   share_trunks=share)
            assert trunk_layers == ([depth] if share else [None])
            if ref is not None:
                assert len(ran) == (0 if share else 1)  # the reference's block 0: from the sampler's states
        for fast, plain in zip(rows[True], rows[False]):
            assert (fast["response"], fast["response_tokens"], fast["gold"]) == (
                plain["response"], plain["response_tokens"], plain["gold"])
            for key in ("proxy", "kl") if ref is not None else ("proxy",):
                assert abs(fast[key] - plain[key]) <= 1e-10 * max(1.0, abs(plain[key])), key
        assert max(abs(row["proxy"]) for row in rows[False]) > 1e-3  # the check has teeth


def test_label_sampling_fills_the_trunk_cache_under_the_reward_models_ids(monkeypatch):
    """`sample_responses(trunk_cache=...)` stores, for every sampled row, the states after block 1 under the ids a
    reward model reads for it (`encode_for_rm`: prompt, response, EOS), equal to one forward over those ids (float64,
    RMSNorm without its float32 cast: 1e-12). The random model's rows run to max_new_tokens (EOS appended after
    the capture's extra forward); rows that stop are covered by the sampler's own capture test."""
    import sys
    from pathlib import Path

    import torch
    from tolerances import float64_rms_norm
    from transformers import AutoTokenizer
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from rlhfkit.data.tokenize import encode_for_rm
    from rlhfkit.models.trunk import TrunkCache, run_blocks
    from rlhfkit.quickstart import pipeline

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "rollout"))
    from test_sampling import TOKENIZER_DIR, tiny_llama

    monkeypatch.setattr(LlamaRMSNorm, "forward", float64_rms_norm)
    tok = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    tok.pad_token = tok.eos_token
    model = tiny_llama(len(tok), seed=2, dtype=torch.float64)
    model.model.rotary_emb.float()
    cache = TrunkCache(model.model, 1)
    prompts = ["Describe a rainy Monday morning commute.", "Tell me about a garden in early spring.", "Hello"]
    out = pipeline.sample_responses(model, tok, prompts, 2, 5, seed=1, batch_size=2, trunk_cache=cache)
    assert len(cache) == 6 and sum(len(r) for r in out) == 6
    for ids, states in cache.states.items():
        row = torch.tensor([list(ids)])
        with torch.no_grad():
            want = run_blocks(model.model, torch.ones_like(row, dtype=torch.bool), 0, 1, input_ids=row)[0]
        torch.testing.assert_close(states, want, rtol=0, atol=1e-12)
        assert ids[-1] == tok.eos_token_id
    # the keys are what a reward model reads for the decoded responses (where the text re-tokenises the same)
    keys = set(cache.states)
    found = 0
    for prompt, responses in zip(prompts, out):
        for text, _ in responses:
            p, r = encode_for_rm(tok, pipeline.user_messages(prompt), text)
            found += tuple(p + r) in keys
    assert found >= 1


@pytest.mark.parametrize("n, batch_size, want", [(585, 168, [147, 147, 147, 144]), (7, 3, [3, 3, 1]),
                                                 (165, 168, [165]), (3, 2, [2, 1])])
def test_label_sampling_batches_by_hand(monkeypatch, n, batch_size, want):
    """The fewest batches of at most ``batch_size`` prompts, each of ceil(n / ceil(n / batch_size)) prompts but the
    last; every prompt's 2 rows in the same batch."""
    import torch

    import rlhfkit.rollout.sampling as sampling
    from rlhfkit.quickstart import pipeline
    from rlhfkit.rollout.sampling import Rollout

    seen = []

    def fake_sample(model, q, qm, *args, **kwargs):
        seen.append(q.shape[0])
        rows = q.shape[0]
        return Rollout(q, qm, torch.full((rows, 1), 7), torch.ones(rows, 1, dtype=torch.bool), torch.zeros(rows, 1),
                       torch.zeros(rows, dtype=torch.bool))

    class Tok:
        eos_token_id, pad_token_id = 2, 0

        def decode(self, ids, skip_special_tokens=True):
            return "w"

    monkeypatch.setattr(sampling, "sample", fake_sample)
    monkeypatch.setattr("rlhfkit.data.tokenize.tokenize_prompts",
                        lambda tok, prompts, max_prompt_length: ([[5, 6]] * len(prompts), None))
    out = pipeline.sample_responses(None, Tok(), [f"p{i}" for i in range(n)], 2, 1, seed=0, batch_size=batch_size)
    assert seen == [2 * k for k in want] and [len(r) for r in out] == [2] * n
