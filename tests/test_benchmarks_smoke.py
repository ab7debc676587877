"""The benchmark harness (benchmarks/): peak-memory measurement, the anchor's pairs, the FLOP counter and the
utilisation arithmetic, argument parsing, tiny rlhfkit-side runs.

The benchmarks themselves (timings) are never run here; only the parts whose correctness the reported numbers
rest on, plus tiny end-to-end runs of the rlhfkit side that break when a trainer interface they use changes
(those spawn processes: marked slow and opt-in, ``RLHFKIT_BENCH_TESTS=1``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
import _common as C  # noqa: E402
import bench_generate  # noqa: E402
import bench_ppo  # noqa: E402
import flops as F  # noqa: E402

ANCHOR = Path(C.DEFAULT_ANCHOR)
CONFIG_DIR = Path(C.DEFAULT_CONFIG_DIR)
# The end-to-end checks spawn several processes (20-60 s each on 2 busy cores): opt in with RLHFKIT_BENCH_TESTS=1.
needs_shared = pytest.mark.skipif(
    not (os.environ.get("RLHFKIT_BENCH_TESTS") == "1" and ANCHOR.is_file() and CONFIG_DIR.is_dir()),
    reason="opt-in (RLHFKIT_BENCH_TESTS=1) and needs the team's anchor script and SmolLM2 config folder")


def _alloc(mib: int) -> list[str]:
    # a child that touches `mib` MiB of fresh memory (one write per 4 KiB page makes each page resident)
    return [sys.executable, "-c", f"b = bytearray({mib} * 2**20)\nfor i in range(0, len(b), 4096): b[i] = 1"]


def test_run_measured_reads_each_childs_own_peak_rss():
    # Big child first, then a small one: a parent-wide RUSAGE_CHILDREN maximum would report the big peak twice.
    # And this (parent) process holds 400 MiB while it spawns them: a child exec'd straight from it would start
    # its ru_maxrss at the parent's high-water mark (what CI's long pytest process showed: 6 GiB for 10 MiB).
    ballast = bytearray(400 * 2**20)
    for i in range(0, len(ballast), 4096):
        ballast[i] = 1
    big = C.run_measured(_alloc(300))
    small = C.run_measured(_alloc(10))
    del ballast
    assert big.returncode == 0 and small.returncode == 0
    assert 300 / 1024 <= big.peak_rss_gb < 390 / 1024  # the touched bytes + interpreter, not the parent's 400
    assert small.peak_rss_gb < 100 / 1024  # interpreter (~30 MiB) + 10 MiB: far below the big child's peak


def test_run_measured_timeout_kills_the_command():
    m = C.run_measured([sys.executable, "-c", "import time; time.sleep(30)"], timeout=1.0)
    assert m.returncode < 0 and m.wall_s < 10


def test_run_measured_reports_failure_and_output():
    m = C.run_measured([sys.executable, "-c", "import sys; print('out'); print('err', file=sys.stderr); sys.exit(3)"])
    assert (m.returncode, m.stdout.strip(), m.stderr.strip()) == (3, "out", "err")
    with pytest.raises(SystemExit, match="exit status 3"):
        C.require_ok(m, "child")


def test_last_json_takes_the_last_matching_line():
    text = 'noise\n{"a": 1}\nBENCH_RESULT {"b": 2}\n{"a": 3}\ntrailing'
    assert C.last_json(text) == {"a": 3}
    assert C.last_json(text, C.RESULT_PREFIX) == {"b": 2}
    with pytest.raises(ValueError):
        C.last_json("nothing here")


def test_ratio_and_results_file(tmp_path):
    assert C.ratio(3.0, 2.0) == 1.5 and C.ratio(1.0, None) is None and C.ratio(1.0, 0.0) is None
    first = C.write_results("x", {"k": 1}, tmp_path)
    second = C.write_results("x", {"k": 2}, tmp_path)  # same day: a new file, the first is kept
    assert first != second and json.loads(first.read_text()) == {"k": 1} and json.loads(second.read_text()) == {"k": 2}


FAKE_TRL = '''
import json, os
class RewardConfig:
    def __init__(self, **kwargs):
        self.kwargs = kwargs
class RewardTrainer:
    def __init__(self, model, args, processing_class, train_dataset):
        self.ds = train_dataset
    def train(self):
        with open(os.environ["FAKE_TRL_DUMP"], "w") as f:
            rows = self.ds.to_dict()
            json.dump({"chosen": rows["chosen_input_ids"], "rejected": rows["rejected_input_ids"]}, f)
'''


@pytest.mark.slow
@needs_shared
def test_anchor_pairs_equal_the_anchor_scripts_own_pairs(tmp_path):
    # Run the real anchor script with a stand-in `trl` package that only records the dataset it is given.
    (tmp_path / "trl").mkdir()
    (tmp_path / "trl" / "__init__.py").write_text(FAKE_TRL)
    dump = tmp_path / "pairs.json"
    env = {**C.child_env(), "PYTHONPATH": str(tmp_path), "FAKE_TRL_DUMP": str(dump)}
    subprocess.run([sys.executable, str(ANCHOR), "rm", str(CONFIG_DIR), "--tiny", "--iters", "2", "--batch", "3"],
                   check=True, env=env, capture_output=True, timeout=300)
    recorded = json.loads(dump.read_text())
    vocab = C.load_bench_config(str(CONFIG_DIR), tiny=True).vocab_size
    chosen, rejected = C.anchor_pairs(vocab, 6)
    assert recorded == {"chosen": chosen, "rejected": rejected}
    assert all(128 <= len(s) < 512 and min(s) >= 100 and max(s) < vocab - 100 for s in chosen + rejected)


def _bench(script: str, tmp_path: Path, *flags: str) -> dict:
    out = subprocess.run([sys.executable, str(BENCH / script), "--tiny", "--which", "ours", "--out", str(tmp_path),
                          *flags], capture_output=True, text=True, timeout=600, env=C.child_env())
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    (path,) = tmp_path.glob("*.json")
    return json.loads(path.read_text())


@pytest.mark.slow
@needs_shared
def test_bench_rm_ours_side_tiny(tmp_path):
    result = _bench("bench_rm.py", tmp_path, "--precision", "bf16", "--iters", "2", "--batch", "2")
    ours = result["results"]["bf16"]["ours"]
    chosen, rejected = C.anchor_pairs(C.load_bench_config(str(CONFIG_DIR), tiny=True).vocab_size, 4)
    assert ours["tokens"] == sum(map(len, chosen + rejected))
    assert ours["pairs"] == 4 and len(ours["step_s"]) == 2 and ours["tokens_per_s"] > 0
    assert 0 < ours["peak_rss_gb"] < 8


@pytest.mark.slow
@needs_shared
def test_bench_ppo_ours_side_tiny(tmp_path):
    result = _bench("bench_ppo.py", tmp_path, "--precision", "fp32")
    ours = result["results"]["fp32"]["ours"]
    assert ours["iterations"] == 2 and len(ours["iter_s"]) == 2
    assert set(ours["split_mean_s"]) == {"rollout", "score", "forward", "update", "other"}
    assert 0 < ours["response_length_mean"] <= 8 and 0 < ours["peak_rss_gb"] < 8
    # the token counts the rollouts recorded: 4 prompts of exactly 8 tokens, responses of 1..8 tokens
    assert [it["prompt"] for it in ours["lengths"]] == [[8] * 4] * 2
    assert all(1 <= n <= 8 for it in ours["lengths"] for n in it["response"])
    assert set(ours["utilisation"]) == {"rollout", "score", "forward", "update", "iteration"}
    assert all(u["gflop"] > 0 and u["utilisation"] > 0 for u in ours["utilisation"].values())
    assert result["machine"]["gemm_peak"]["float32"]["peak_gflops"] > 0
    # PhaseParts: the phases as time/* has them, each part within its phase
    parts = ours["parts_mean_s"]
    assert {"rollout/model_forwards", "rollout/draws", "update/policy_forward", "update/critic_forward",
            "update/backward"} <= set(parts) and set(ours["parts_mean_faults"]) == set(parts)
    assert 0 < parts["rollout/model_forwards"] + parts["rollout/draws"] <= parts["rollout"]
    assert 0 < parts["update/policy_forward"] + parts["update/backward"] <= parts["update"]
    assert parts["rollout/rest"] >= 0 and parts["update/rest"] >= 0


@pytest.mark.slow
@needs_shared
def test_bench_ppo_shared_critic_row_tiny(tmp_path):
    # --critic both: the separate-critic row, the --critic shared row and their ratio, on the same prepared models
    result = _bench("bench_ppo.py", tmp_path, "--precision", "fp32", "--critic", "both")
    row = result["results"]["fp32"]
    assert set(row) == {"ours", "shared", "ratio"} and result["settings"]["critic"] == "both"
    assert (row["ours"]["critic"], row["shared"]["critic"]) == ("separate", "shared")
    assert row["ratio"]["speedup_shared_vs_separate"] > 0 and row["ratio"]["peak_rss_shared_vs_separate"] > 0
    # no critic model: no critic FLOPs in the shared row's forward and update phases
    assert row["shared"]["model_flops"]["forward_critic"] == row["shared"]["model_flops"]["update_critic"] == 0
    assert row["ours"]["model_flops"]["update_critic"] > 0


REPO = Path(__file__).resolve().parents[1]
needs_wheel = pytest.mark.skipif(os.environ.get("RLHFKIT_BENCH_TESTS") != "1",
                                 reason="opt-in (RLHFKIT_BENCH_TESTS=1): loads the real SmolLM2 of the wheel")


@pytest.mark.slow
@needs_wheel
def test_bench_ppo_realistic_tiny_with_a_compare_checkout(tmp_path):
    # the realistic workload (real SmolLM2, quickstart prompts), a second rlhfkit row from a checkout (this one)
    result = _bench("bench_ppo.py", tmp_path, "--workload", "realistic", "--precision", "fp32", "--compare-src",
                    str(REPO))
    row = result["results"]["fp32"]
    assert set(row) == {"ours", "compare", "ratio"} and row["ratio"]["speedup_vs_compare"] > 0
    assert row["compare"]["rlhfkit_file"] == str(REPO / "src" / "rlhfkit" / "__init__.py")
    assert row["compare"]["freeze_layers"] == bench_ppo.QUICKSTART_PPO_TINY["freeze_layers"]
    prompts = {n for it in row["ours"]["lengths"] for n in it["prompt"]}
    assert len(row["ours"]["lengths"]) == 2 and min(prompts) > 10  # chat-templated prompts of varying length
    assert result["settings"]["workload"] == "realistic" and row["ours"]["utilisation"]["update"]["gflop"] > 0


@pytest.mark.slow
@needs_wheel
def test_bench_generate_tiny(tmp_path):
    out = subprocess.run([sys.executable, str(BENCH / "bench_generate.py"), "--batch", "2", "--max-new-tokens", "3",
                          "--compare-src", str(REPO), "--out", str(tmp_path)], capture_output=True, text=True,
                         timeout=900, env=C.child_env())
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    (path,) = tmp_path.glob("*.json")
    result = json.loads(path.read_text())
    assert set(result["results"]) == {"ours", "hf", "compare"}
    for r in result["results"].values():
        assert len(r["response_lengths"][0]) == 2 and all(1 <= n <= 3 for n in r["response_lengths"][0])
        assert r["tokens"] == sum(r["response_lengths"][0]) and r["time_over_floor"] > 1


# ----------------------------------------------------------------------------------------------------------
# The FLOP counter (benchmarks/flops.py). FLOP counts are integers far below 2**53: compared exactly.
# ----------------------------------------------------------------------------------------------------------
# 1 layer, hidden 4, intermediate 8, 2 heads of dim 2, 1 kv head, vocabulary 10. Multiply-adds per token:
#   q 4·(2·2) = 16, k 4·(1·2) = 8, v 8        -> qkv  32 MACs =  64 FLOPs
#   o (2·2)·4 = 16, MLP 3·4·8 = 96            -> rest 112 MACs = 224 FLOPs        (block: 288 FLOPs per token)
#   attention per (query, key) pair: q·k and p·v over 2 heads of dim 2 = 8 MACs = 16 FLOPs
#   LM head per position with logits: 4·10 = 40 MACs = 80 FLOPs; a scalar head: 4 MACs = 8 FLOPs
TINY = F.DecoderShape(hidden=4, intermediate=8, layers=1, heads=2, kv_heads=1, head_dim=2, vocab=10, tied=True)


def test_forward_flops_hand_computed():
    # 3 tokens, causal: key lengths 1 + 2 + 3 = 6; logits at 2 positions
    fwd = F.sequence_forward(TINY, 3, head_positions=2, head_outputs=10)
    assert fwd == F.PassFlops(qkv=3 * 64, rest=3 * 224, attention=6 * 16, head=2 * 80)
    assert fwd.total(TINY.layers) == 864 + 96 + 160 == 1120
    # a decode step after 5 cached tokens: 1 token, 1 query over 6 keys, logits at it
    assert F.forward_pass(TINY, 1, F.causal_key_sum(1, 5), 1, 10).total(1) == 288 + 6 * 16 + 80
    assert F.causal_key_sum(3) == 6 and F.causal_key_sum(2, past=4) == 5 + 6


def test_generation_flops_hand_computed_and_equal_to_one_forward():
    # prompt 2, response 3: prefill over 2 tokens (keys 1 + 2, logits at 1 position) -> 2·288 + 3·16 + 80 = 704;
    # decode feeds response tokens 1 and 2 (keys 3, then 4)                     -> (288 + 48 + 80) + (288 + 64 + 80)
    assert F.generation_flops(TINY, 2, 3) == 704 + 416 + 432 == 1552
    # the KV cache changes when the work is done, not how much: one forward over 2 + 3 - 1 tokens, logits at 3
    for p, r in ((2, 3), (7, 1), (1, 9)):
        assert F.generation_flops(TINY, p, r) == F.sequence_forward(TINY, p + r - 1, r, TINY.vocab).total(1)
    assert F.generation_flops(TINY, 4, 0) == 0


def test_backward_flops_hand_computed():
    two = F.DecoderShape(hidden=4, intermediate=8, layers=2, heads=2, kv_heads=1, head_dim=2, vocab=10, tied=True)
    fwd = F.sequence_forward(two, 3, 2, 10)  # per block 3·288 + 6·16 = 960; head 160
    assert F.backward_flops(two, fwd, frozen_below=0, head_trained=True) == 2 * (2 * 960) + 2 * 160
    # lowest block frozen (no backward there), tied head frozen with the embeddings: its activation gradient only
    assert F.backward_flops(two, fwd, frozen_below=1, head_trained=False) == 2 * 960 + 160
    assert F.backward_flops(two, fwd, frozen_below=2, head_trained=False) == 160
    assert F.policy_training(two, 0) == (0, True) and F.policy_training(two, 1) == (1, False)
    assert F.policy_training(F.DecoderShape(**{**two.to_dict(), "tied": False}), 1) == (1, True)
    with pytest.raises(ValueError):
        F.backward_flops(two, fwd, frozen_below=3, head_trained=True)


def test_ppo_phase_flops_hand_computed():
    # one row: prompt 2, response 3 (sequence of 5: linear 5·288 = 1440, keys 15 -> 240), 2 epochs, full tuning
    phases = F.ppo_phase_flops(TINY, [2], [3], ppo_epochs=2)
    policy = 1440 + 240 + 3 * 80  # LM head at the 3 response-predicting positions: 1920
    critic = 1440 + 240 + 3 * 8   # value head at the same positions: 1704
    assert phases == {"generation": 1552, "score": 1440 + 240 + 8, "forward_policy": policy,
                      "forward_reference": policy, "forward_critic": critic,
                      "update_policy": 2 * 3 * policy, "update_critic": 2 * 3 * critic}
    # rows add up; a frozen lowest block removes its backward (here the only block: the head's gradient is left)
    two_rows = F.ppo_phase_flops(TINY, [2, 4], [3, 1], ppo_epochs=1)
    assert two_rows["forward_policy"] == policy + F.sequence_forward(TINY, 5, 1, 10).total(1)
    frozen = F.ppo_phase_flops(TINY, [2], [3], ppo_epochs=1, policy_freeze_layers=1, critic_freeze_layers=1)
    assert frozen["update_policy"] == policy + 3 * 80 and frozen["update_critic"] == critic + 2 * 3 * 8
    with pytest.raises(ValueError):
        F.ppo_phase_flops(TINY, [2], [3, 4], ppo_epochs=1)


def test_decoder_shape_from_a_transformers_config():
    from transformers import LlamaConfig

    cfg = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                      num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True)
    assert F.DecoderShape.from_config(cfg) == F.DecoderShape(576, 1536, 30, 9, 3, 64, 49152, True)
    assert F.DecoderShape.from_config(F.DecoderShape.from_config(cfg).to_dict()) == F.DecoderShape.from_config(cfg)


def _tiny_llama(**overrides):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=3, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=4, vocab_size=32, tie_word_embeddings=True,
                      attn_implementation="eager", **overrides)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).double(), F.DecoderShape.from_config(cfg)


def _square_excess(shape, length: int) -> int:
    # torch's counter charges attention's matmuls for the whole L×L square; the model count (real key lengths)
    # for the causal triangle: 2 products × 2·n·d FLOPs per pair × (L² − L(L+1)/2) pairs, per layer
    return 4 * shape.heads * shape.head_dim * (length * length - F.causal_key_sum(length))


@pytest.mark.parametrize("freeze", [0, 1, 3])
def test_flop_counter_agrees_with_torchs_own_counter_forward_and_backward(freeze):
    # An independent count: torch.utils.flop_counter records every matmul autograd really runs, including which
    # backward products freezing removes and the tied head's activation-only gradient.
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from rlhfkit.models.adapters import freeze_lower_layers

    model, shape = _tiny_llama()
    if freeze:
        freeze_lower_layers(model, freeze)
    ids = torch.randint(0, 32, (1, 5))
    with FlopCounterMode(display=False) as fwd_counter:
        out = model(input_ids=ids, logits_to_keep=3)
    with FlopCounterMode(display=False) as bwd_counter:
        out.logits.sum().backward()
    fwd = F.sequence_forward(shape, 5, 3, shape.vocab)
    excess = _square_excess(shape, 5)
    assert fwd_counter.get_total_flops() == fwd.total(shape.layers) + shape.layers * excess
    trained = shape.layers - freeze
    assert bwd_counter.get_total_flops() == (F.backward_flops(shape, fwd, *F.policy_training(shape, freeze))
                                             + trained * 2 * excess)


def test_generation_flops_agree_with_torchs_counter_on_rlhfkits_sampler():
    # The sampler's real work on B rows of prompt 4 running 5 steps: the prefill (square-counted by torch) and one
    # single-token step per further token (exact); no extra forward after the last token.
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from rlhfkit.rollout.sampling import GenerationConfig, sample

    model, shape = _tiny_llama()
    ids = torch.randint(3, 32, (2, 4))
    gen = GenerationConfig(max_new_tokens=5, temperature=1.0, stop_token_ids=(), pad_token_id=0)
    with FlopCounterMode(display=False) as counter:
        out = sample(model.eval(), ids, torch.ones_like(ids, dtype=torch.bool), gen,
                     generator=torch.Generator().manual_seed(0))
    assert out.response_mask.sum(-1).tolist() == [5, 5]
    assert counter.get_total_flops() == 2 * (F.generation_flops(shape, 4, 5) + shape.layers * _square_excess(shape, 4))


# ----------------------------------------------------------------------------------------------------------
# Peak and utilisation arithmetic
# ----------------------------------------------------------------------------------------------------------
def test_utilisation_arithmetic():
    # 3 GFLOP in 1.5 s = 2 GFLOP/s; against a 4 GFLOP/s peak: 0.5
    assert C.utilisation(3e9, 1.5, 4.0) == {"time_s": 1.5, "gflop": 3.0, "gflops": 2.0, "utilisation": 0.5}
    assert C.utilisation(3e9, None, 4.0) == {"time_s": None, "gflop": 3.0, "gflops": None, "utilisation": None}
    assert C.utilisation(3e9, 1.5, None)["utilisation"] is None
    assert C.gemm_gflops(1000, 2, 1.0) == 4.0  # 2 products of 2·1000³ FLOPs in 1 s
    peaks = {"float32": {"peak_gflops": 300.0}, "bfloat16": {"peak_gflops": 2000.0}}
    assert C.peak_of(peaks, "fp32") == 300.0 and C.peak_of(peaks, "bf16") == 2000.0 and C.peak_of({}, "fp32") is None
    # bench_ppo: each timed phase gets the FLOPs of its own model passes, the iteration all of them
    flops = dict.fromkeys(F.PPO_PHASES, 1e9)
    util = bench_ppo.phase_utilisation("ours", flops, {"rollout": 1.0, "score": 0.5, "forward": 3.0, "update": 1.0},
                                       iteration_s=7.0, peak_gflops=10.0)
    assert {k: (u["gflop"], u["gflops"]) for k, u in util.items()} == {
        "rollout": (1.0, 1.0), "score": (1.0, 2.0), "forward": (3.0, 1.0), "update": (2.0, 2.0),
        "iteration": (7.0, 1.0)}
    assert util["update"]["utilisation"] == 0.2
    trl = bench_ppo.phase_utilisation("trl", flops, {"generation": 1.0, "no_grad_forwards": 3.0, "update": 2.0},
                                      iteration_s=6.0, peak_gflops=None)
    assert trl["no_grad_forwards"]["gflop"] == 3.0 and trl["iteration"]["gflop"] == 6.0  # no policy forward


def test_measure_gemm_peak_small_sizes():
    peak = C.measure_gemm_peak(sizes=(16, 32), repeats=2, min_timing_s=0.001)
    assert peak["threads"] >= 1 and peak["sizes"] == [16, 32]
    for dtype in ("float32", "bfloat16"):
        assert set(peak[dtype]["by_size"]) == {"16", "32"}
        assert peak[dtype]["peak_gflops"] == max(peak[dtype]["by_size"].values()) > 0


def test_pass_gemms_shapes_and_flops_hand_computed():
    # TINY: q 2·2 = 4 = H, kv 1·2 = 2; per block q (M,4,4), k/v (M,4,2), o (M,4,4), gate/up (M,4,8), down (M,8,4)
    fwd = F.pass_gemms(TINY, 3, 2)
    assert [(g.m, g.k, g.n, g.count, g.transposed) for g in fwd] == [
        (3, 4, 4, 1, "b"), (3, 4, 2, 1, "b"), (3, 4, 2, 1, "b"), (3, 4, 4, 1, "b"), (3, 4, 8, 1, "b"),
        (3, 4, 8, 1, "b"), (3, 8, 4, 1, "b"), (2, 4, 10, 1, "b")]
    # = forward_pass's qkv + rest (3·64 + 3·224 = 864) and head (2·80 = 160), the attention core left out
    assert sum(g.flops() for g in fwd) == 864 + 160
    both = F.pass_gemms(TINY, 3, 2, backward=True)
    assert len(both) == 24 and sum(g.flops() for g in both) == 3 * (864 + 160)
    # input gradient (M, N) @ (N, K) and weight gradient (N, M) @ (M, K) of the down projection (3, 8, 4)
    assert (3, 4, 8, 1, "") in [tuple(g) for g in both[8:16]] and (4, 3, 8, 1, "a") in [tuple(g) for g in both[16:]]
    two = F.DecoderShape(**{**TINY.to_dict(), "layers": 2})
    assert [g.count for g in F.pass_gemms(two, 3, 0)] == [2] * 7  # no head positions: no head product
    # the SmolLM2 shapes: one pass's matmuls equal the FLOP counter's for the same tokens
    smol = F.DecoderShape(576, 1536, 30, 9, 3, 64, 49152, True)
    p = F.forward_pass(smol, 512, 0, 256, smol.vocab)
    assert sum(g.flops() for g in F.pass_gemms(smol, 512, 256, backward=True)) == 3 * (30 * (p.qkv + p.rest) + p.head)


def test_measure_gemms_rate_is_total_flops_over_total_time():
    # shapes large enough that the rate, rounded to 0.1 GFLOP/s, is not 0 on a loaded core (TINY's products run at
    # ~0.1 GFLOP/s)
    small = F.DecoderShape(hidden=64, intermediate=128, layers=1, heads=4, kv_heads=2, head_dim=16, vocab=256,
                           tied=True)
    gemms = F.pass_gemms(small, 8, 16, backward=True)
    r = C.measure_gemms(gemms, "float32", repeats=2, min_timing_s=0.001)
    assert r["dtype"] == "float32" and r["threads"] >= 1
    assert r["gflop"] == round(sum(g.flops() for g in gemms) / 1e9, 3)
    # each distinct (M, K, N, layout) timed once (k and v share a shape, so do gate and up, and q and o)
    distinct = {(g.m, g.k, g.n, g.transposed) for g in gemms}
    assert set(r["by_shape"]) == {f"{m}x{k}x{n}" + (f",{t}" if t else "") for m, k, n, t in distinct}
    assert r["gflops"] > 0 and r["seconds"] > 0
    # the pass rate is the FLOP-weighted harmonic mean of the products' rates: between the slowest and the fastest
    assert min(r["by_shape"].values()) - 0.1 <= r["gflops"] <= max(r["by_shape"].values()) + 0.1


def test_shape_ceiling_shares():
    util = {"update": {"gflops": 50.0}, "forward": {"gflops": 80.0}, "rollout": {"gflops": None},
            "score": {"gflops": 30.0}}
    ceilings = {"update": {"gflops": 100.0}, "forward": {"gflops": 160.0}, "decode": {"gflops": 40.0}}
    bench_ppo.add_ceiling_shares("ours", util, ceilings)
    assert util["update"]["of_shape_ceiling"] == 0.5 and util["forward"]["of_shape_ceiling"] == 0.5
    assert "of_shape_ceiling" not in util["rollout"] and "of_shape_ceiling" not in util["score"]
    a = bench_ppo.parse_args([])
    assert bench_ppo.micro_batch_tokens(a, bench_ppo.ppo_settings(a)) == (4 * 128, 4 * 64)  # the anchor's, exactly


def test_phase_parts_split_the_phases_by_the_functions_that_run_them(monkeypatch):
    # A fake clock and fault counter that the fake phases advance by known amounts: every part must land in its own
    # key, only while its phase runs (a draw or backward outside it is not counted), per iteration, and the steady
    # means drop the first iteration. Every function PhaseParts wraps is registered with monkeypatch first, so the
    # originals are back after the test.
    import torch

    from rlhfkit.rollout import prepack, sampling
    from rlhfkit.train import ppo_update

    class Clock:
        t, faults = 0.0, 0

        def perf_counter(self) -> float:
            return self.t

        def spend(self, seconds: float, faults: int = 0) -> None:
            self.t += seconds
            self.faults += faults

    clock = Clock()
    monkeypatch.setattr(bench_ppo, "time", clock)
    monkeypatch.setattr(bench_ppo, "minor_faults", lambda: clock.faults)
    monkeypatch.setattr(sampling, "draw_tokens", lambda: clock.spend(0.5, 3))
    monkeypatch.setattr(prepack, "_pack", lambda: clock.spend(0.25, 100))
    monkeypatch.setattr(ppo_update, "policy_forward", lambda: clock.spend(2.0))
    monkeypatch.setattr(ppo_update, "critic_forward", lambda: clock.spend(1.0))
    monkeypatch.setattr(torch.Tensor, "backward", lambda self: clock.spend(4.0, 7))

    class Policy(torch.nn.Module):
        def forward(self) -> None:
            clock.spend(1.5, 10)
            prepack._pack()  # inside a forward, as the sampler's decode products pack

    class Trainer:
        def __init__(self) -> None:
            self.policy = Policy()

        def rollout(self) -> None:
            self.policy()
            sampling.draw_tokens()
            clock.spend(0.125)

        def raw_scores(self) -> None:
            clock.spend(0.75, 2)

        def prepare(self) -> None:
            sampling.draw_tokens()  # outside the rollout: not a rollout draw
            ppo_update.policy_forward()  # the no-grad phase's passes: not the update's

        def update(self) -> None:
            self.policy()  # the update's forward: not a rollout forward
            ppo_update.policy_forward()
            ppo_update.critic_forward()
            torch.zeros(()).backward()
            clock.spend(0.5)

        def iteration(self, step: int) -> None:
            for phase in (self.rollout, self.raw_scores, self.prepare, self.update):
                phase()
            clock.spend(0.25 * step)  # outside every phase
            torch.zeros(()).backward()  # outside the update

    trainer = Trainer()
    parts = bench_ppo.PhaseParts(trainer)
    for step in (1, 2, 3):
        trainer.iteration(step)
    expected = {"rollout": 2.375, "rollout/model_forwards": 1.75, "rollout/weight_packing": 0.25,
                "rollout/draws": 0.5, "score": 0.75, "forward": 2.5, "update": 9.25, "update/policy_forward": 2.0,
                "update/critic_forward": 1.0, "update/backward": 4.0}
    assert parts.iterations == [expected] * 3
    assert parts.faults[0] == {"rollout": 113, "rollout/model_forwards": 110, "rollout/weight_packing": 100,
                               "rollout/draws": 3, "score": 2, "forward": 3, "update": 117, "update/policy_forward": 0,
                               "update/critic_forward": 0, "update/backward": 7}
    steady = parts.steady()
    assert steady["parts_mean_s"] == {**expected, "rollout/rest": 0.125, "update/rest": 2.25}
    assert steady["parts_mean_faults"]["update/rest"] == 110 and steady["parts_mean_faults"]["rollout/rest"] == 0


# ----------------------------------------------------------------------------------------------------------
# Arguments and settings
# ----------------------------------------------------------------------------------------------------------
def test_bench_ppo_arguments():
    a = bench_ppo.parse_args([])
    assert (a.workload, a.which, a.batch, a.resp, a.prompt, a.iters) == ("anchor", "both", 16, 64, 64, 3)
    anchor = bench_ppo.ppo_settings(a)  # the anchor workload, unchanged
    assert {k: anchor[k] for k in ("ppo_epochs", "num_minibatches", "micro_batch_size", "learning_rate", "kl_coef",
                                   "vf_coef", "temperature", "max_new_tokens", "rollout_batch_size")} == {
        "ppo_epochs": 4, "num_minibatches": 1, "micro_batch_size": 4, "learning_rate": 3e-6, "kl_coef": 0.05,
        "vf_coef": 0.1, "temperature": 0.7, "max_new_tokens": 64, "rollout_batch_size": 16}
    r = bench_ppo.parse_args(["--workload", "realistic", "--compare-src", "/old", "--ours-src", "/new"])
    assert (r.which, r.batch, r.resp, r.prompt, r.compare_src, r.ours_src) == ("ours", 32, 128, 0, "/old", "/new")
    assert (a.critic, bench_ppo.parse_args(["--critic", "both"]).critic) == ("separate", "both")
    realistic = bench_ppo.ppo_settings(r)
    assert realistic["temperature"] == 1.0 and realistic["max_new_tokens"] == 128 and "overlong" not in realistic
    for bad in (["--workload", "realistic", "--which", "both"], ["--workload", "realistic", "--prompt", "8"],
                ["--which", "trl", "--compare-src", "/old"], ["--batch", "6"], ["--which", "trl", "--critic", "shared"]):
        with pytest.raises(SystemExit):
            bench_ppo.parse_args(bad)


@pytest.mark.parametrize("scale, ours", [("default", bench_ppo.QUICKSTART_PPO),
                                         ("tiny", bench_ppo.QUICKSTART_PPO_TINY)])
def test_realistic_workload_keeps_the_quickstarts_ppo_settings(scale, ours):
    from rlhfkit.quickstart.pipeline import PRESETS

    p = PRESETS[scale]
    assert ours == {"ppo_epochs": p.ppo_epochs, "num_minibatches": p.ppo_minibatches,
                    "micro_batch_size": p.ppo_micro_batch, "freeze_layers": p.policy_freeze_layers,
                    "critic_freeze_layers": p.critic_freeze_layers, "learning_rate": p.policy_lr,
                    "critic_learning_rate": p.critic_lr, "kl_coef": p.kl_coef}
    shape = bench_ppo.REALISTIC_TINY if scale == "tiny" else bench_ppo.REALISTIC
    assert shape["batch"] == p.ppo_batch


def test_bench_generate_arguments_and_token_count():
    a = bench_generate.parse_args([])
    assert (a.batch, a.max_new_tokens, a.engines, a.vllm_python) == (64, 32, ["ours", "hf"], None)
    for bad in (["--which", "ours,trl"], ["--batch", "0"], ["--which", "hf", "--compare-src", "/old"]):
        with pytest.raises(SystemExit):
            bench_generate.parse_args(bad)
    # real response tokens: up to and including the first EOS (2); a row without EOS counts all its tokens
    assert bench_generate.response_lengths([[5, 2, 2, 2], [5, 6, 7, 8], [2, 2, 2, 2]], eos=2) == [2, 4, 1]


def test_bench_generate_summary_floor():
    # 2 rows (prompts 2 and 4) of the TINY shape, responses 3 and 1 tokens, 0.5 s: floor = FLOPs / peak
    r = bench_generate.summarise({"times_s": [0.5], "response_lengths": [[3, 1]]}, [2, 4], TINY, peak_gflops=1e-6)
    flop = F.generation_flops(TINY, 2, 3) + F.generation_flops(TINY, 4, 1)
    assert (r["tokens"], r["tokens_per_s"], r["response_length_mean"]) == (4, 8.0, 2.0)
    assert r["floor_s"] == round(flop / 1e3, 4) and r["time_over_floor"] == round(0.5 / (flop / 1e3), 2)
    assert "shape_floor_s" not in r
    # the shape floor: the prefills (2 and 4 tokens, logits at 1 position) at the prefill rate, the rest at the
    # decode rate (here 1e-6 and 2e-6 GFLOP/s: 1e3 and 2e3 FLOP/s)
    ceilings = {"prefill": {"gflops": 1e-6}, "decode": {"gflops": 2e-6}}
    r = bench_generate.summarise({"times_s": [0.5], "response_lengths": [[3, 1]]}, [2, 4], TINY, 1e-6, ceilings)
    prefill = sum(F.sequence_forward(TINY, p, 1, TINY.vocab).total(1) for p in (2, 4))
    assert prefill == F.generation_flops(TINY, 4, 1) + F.sequence_forward(TINY, 2, 1, 10).total(1)  # 1 token: prefill
    assert r["shape_floor_s"] == round(prefill / 1e3 + (flop - prefill) / 2e3, 4)
    assert r["time_over_shape_floor"] == round(0.5 / (prefill / 1e3 + (flop - prefill) / 2e3), 2)


FAKE_VLLM = """
import json, os
__version__ = "0-fake"
class SamplingParams:
    def __init__(self, **kw):
        self.kw = kw
class _Out:
    def __init__(self, ids):
        self.token_ids = ids
class _Req:
    def __init__(self, ids):
        self.outputs = [_Out(ids)]
class LLM:
    def __init__(self, **kw):
        with open(os.environ["FAKE_VLLM_DUMP"], "w") as f:
            json.dump(kw, f)
    def generate(self, prompts, params, use_tqdm=True):
        # row b: b + 1 tokens, the last one the EOS of the stop list
        return [_Req([7] * b + params.kw["stop_token_ids"]) for b in range(len(prompts))]
"""


def test_vllm_child_protocol_with_a_stand_in_vllm(tmp_path):
    # The vLLM row's script against a stand-in `vllm` that records the engine arguments: lengths counted from the
    # output token ids, the in-process eager float32 engine, the result line the parent reads.
    (tmp_path / "vllm").mkdir()
    (tmp_path / "vllm" / "__init__.py").write_text(FAKE_VLLM)
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"model": "/m", "prompt_ids": [[1, 2], [1, 2, 3], [4]], "eos": 2, "pad": 2,
                               "max_new_tokens": 4, "repeats": 2, "seed": 0}))
    env = {**C.child_env(), "PYTHONPATH": str(tmp_path), "FAKE_VLLM_DUMP": str(tmp_path / "llm.json")}
    out = subprocess.run([sys.executable, str(BENCH / "_vllm_generate.py"), str(job)], capture_output=True,
                         text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    result = C.last_json(out.stdout, C.RESULT_PREFIX)
    assert result["response_lengths"] == [[1, 2, 3], [1, 2, 3]] and len(result["times_s"]) == 2
    assert json.loads((tmp_path / "llm.json").read_text()) == {"model": "/m", "dtype": "float32",
                                                             "enforce_eager": True, "seed": 0, "max_model_len": 7}


@pytest.mark.slow
@needs_shared
def test_rm_packing_ratio_tiny():
    """The one-process packed-vs-padded measurement runs, on the benchmark's own first pairs."""
    import rm_packing_ratio
    import torch

    threads = torch.get_num_threads()
    try:
        out = rm_packing_ratio.main(["--tiny", "--pairs", "2"])
    finally:
        torch.set_num_threads(threads)
    chosen, rejected = C.anchor_pairs(C.load_bench_config(str(CONFIG_DIR), tiny=True).vocab_size, 64)
    assert out[1]["real_tokens"] == out[2]["real_tokens"] == sum(map(len, chosen[:2] + rejected[:2]))
    widths = [max(len(chosen[i]), len(rejected[i])) for i in range(2)]
    assert out[1]["padded_tokens"] == 2 * sum(widths) and out[2]["padded_tokens"] == 4 * max(widths)
    assert all(r["packed_s"] > 0 and r["padded_s"] > 0 for r in out.values())


@pytest.mark.slow
@needs_shared
def test_ppo_packing_ratio_tiny():
    """The one-process packed-vs-padded PPO measurement runs on one rollout (tiny random model)."""
    import ppo_packing_ratio
    import torch

    threads = torch.get_num_threads()
    try:
        out = ppo_packing_ratio.main(["--tiny", "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    assert out["rows"] == 4 and 0 < out["real_tokens"] <= out["padded_tokens"]
    assert out["packed_s"] > 0 and out["padded_s"] > 0


@pytest.mark.slow
@needs_shared
def test_ppo_packing_ratio_prefix_tiny():
    """--prefix: shared vs unshared prefix, both packed; the packing module's threshold is restored after."""
    import ppo_packing_ratio
    import torch

    from rlhfkit.models import packing

    threads, saving = torch.get_num_threads(), packing.MIN_PREFIX_SAVING
    try:
        out = ppo_packing_ratio.main(["--tiny", "--threads", "1", "--prefix"])
    finally:
        torch.set_num_threads(threads)
    assert packing.MIN_PREFIX_SAVING == saving
    assert out["prefix_shared_s"] > 0 and out["prefix_unshared_s"] > 0 and "packed_s" not in out


@pytest.mark.slow
@needs_shared
def test_quickstart_algorithms_table_tiny(tmp_path):
    """Two algorithms through the whole tiny quickstart, one process each: the table and the results file."""
    pytest.importorskip("vaderSentiment")
    import quickstart_algorithms

    out = quickstart_algorithms.main(["--scale", "tiny", "--algorithms", "ppo", "rloo", "--out", str(tmp_path)])
    assert list(out["runs"]) == ["ppo", "rloo"]
    for algorithm, run in out["runs"].items():
        assert run["summary"]["algorithm"] == algorithm and 0 <= run["summary"]["win_rate"] <= 1
        assert run["peak_rss_gib"] > 0.1
    # the same labels and reward model for both (the RL step is the only difference)
    assert out["runs"]["ppo"]["summary"]["rm_accuracy"] == out["runs"]["rloo"]["summary"]["rm_accuracy"]
    assert "reused_from" in out["runs"]["rloo"]["summary"] and "reused_from" not in out["runs"]["ppo"]["summary"]
    assert "| rloo" in out["table"] and len(list(tmp_path.glob("quickstart-algorithms-tiny-*.json"))) == 1


def test_quickstart_recipes_parse_and_refuse():
    import quickstart_recipes as R

    assert R.parse_recipe("preset") == ("preset", {})
    assert R.parse_recipe("lr:learning_rate=8e-5,adaptive_kl=true,kl_estimator=k3") == (
        "lr", {"learning_rate": 8e-5, "adaptive_kl": True, "kl_estimator": "k3"})
    for bad, words in [(":learning_rate=1", "no name"), ("x:learning_rate", "not field=value"),
                       ("x:no_such_field=1", "no field 'no_such_field'"), ("x:seed=3", "fixed by the run"),
                       ("x:output=/tmp", "fixed by the run")]:
        with pytest.raises(SystemExit, match=words):
            R.parse_recipe(bad)


def test_quickstart_recipes_summary_hand_computed():
    import quickstart_recipes as R

    row = lambda name, win, kl, gold, t: {"recipe": name, "win_rate": win, "mean_kl": kl,  # noqa: E731
                                          "gold_after_mean": gold, "time_rl_s": t}
    rows = [row("b", 0.5, 4.0, 0.25, 10.0), row("a", 0.75, 6.0, 0.5, 20.0), row("b", 0.75, 8.0, 0.75, 30.0),
            row("b", 1.0, 6.0, 0.5, 20.0)]
    (b, a) = R.summarise(rows)  # first-seen order
    assert b[:3] == ("b", 3, 0.75) and b[3] == pytest.approx(0.25, abs=1e-15)  # sd of (0.5, 0.75, 1.0)
    assert b[4:6] == (0.5, 6.0) and b[6] == pytest.approx(2.0, abs=1e-15) and b[7] == 20.0
    assert a == ("a", 1, 0.75, None, 0.5, 6.0, None, 20.0)


@pytest.mark.slow
@needs_shared
def test_quickstart_recipes_tiny(tmp_path):
    """Two recipes × two RL seeds on one tiny quickstart run: a row each, the seed (not the recipe's kl_coef, which
    one iteration of the tiny preset barely feels) is what changes the trained policy, and the results file."""
    pytest.importorskip("vaderSentiment")
    import quickstart_recipes as R

    out = R.main(["--scale", "tiny", "--seeds", "0", "1", "--recipe", "preset", "--recipe", "kl:kl_coef=0.1",
                  "--out", str(tmp_path)])
    assert [(r["recipe"], r["seed"]) for r in out["rows"]] == [("preset", 0), ("preset", 1), ("kl", 0), ("kl", 1)]
    assert out["rows"][2]["over"] == {"kl_coef": 0.1}
    for r in out["rows"]:
        assert 0 <= r["win_rate"] <= 1 and r["time_rl_s"] > 0 and len(r["gold_by_iteration"]) == 1
    assert out["rows"][0]["gold_by_iteration"] != out["rows"][1]["gold_by_iteration"]  # the RL seed decides
    assert out["rows"][0]["gold_by_iteration"] == out["rows"][2]["gold_by_iteration"]  # same rollouts, seed 0
    # the preset at the run's own seed is the quickstart's own RL step and evaluation, number for number
    for key in ("win_rate", "mean_kl", "gold_after_mean", "proxy_after_mean", "gold_before_mean"):
        assert out["rows"][0][key] == out["run_summary"][key], key
    assert "| kl " in out["means_table"] and len(list(tmp_path.glob("quickstart-recipes-tiny-*.json"))) == 1


def test_quickstart_recipes_refuses_an_unfinished_run(tmp_path):
    import quickstart_recipes as R

    (tmp_path / "config.yaml").write_text("scale: tiny\n")
    with pytest.raises(SystemExit, match=r"not a finished quickstart run folder \(summary.json, .*eval/before"):
        R.main(["--from_run", str(tmp_path), "--out", str(tmp_path / "res")])


def test_quickstart_recipes_config_is_the_runs_rl_step_with_the_recipe(tmp_path):
    """A recipe replaces exactly its fields of the run's own RL-step config (and the seed); PPOConfig's own checks
    refuse a bad value before any row runs."""
    import dataclasses

    import quickstart_recipes as R
    from rlhfkit.errors import RlhfkitError
    from rlhfkit.quickstart import pipeline as P

    sft = tmp_path / "sft"
    sft.mkdir()
    (sft / "config.json").write_text("{}")
    (tmp_path / "config.yaml").write_text(f"scale: tiny\nseed: 3\nmodel: {sft}\nprecision: fp32\n")
    cfg, path, got = R.recipe_config(tmp_path, tmp_path / "out", {"learning_rate": 8e-5, "kl_coef": 0.5}, seed=7)
    assert (cfg.scale, cfg.seed, path) == ("tiny", 3, str(sft))
    want = P.rl_step_config(cfg, str(sft), str(tmp_path / "models/reward_model"),
                            str(tmp_path / "data/ppo_prompts.jsonl"), str(tmp_path / "out"), False)
    diff = {f.name for f in dataclasses.fields(got) if getattr(got, f.name) != getattr(want, f.name)}
    assert diff == {"learning_rate", "kl_coef", "seed", "overwrite"}
    assert (got.learning_rate, got.kl_coef, got.seed, got.overwrite) == (8e-5, 0.5, 7, True)
    with pytest.raises(RlhfkitError, match="learning_rate"):
        R.recipe_config(tmp_path, tmp_path / "out", {"learning_rate": -1.0}, seed=0)
