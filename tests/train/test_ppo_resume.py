"""Checkpoints and the final save: exact resume, atomic checkpoints, HF-loadable outputs, output-folder rules."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
import torch
from ppo_helpers import make_config, one_thread, without_timing  # noqa: F401  (one_thread: autouse fixture)
from safetensors.torch import load_file
from tolerances import assert_close_f32, assert_within, forward_factor, linear_terms, logprob_tolerance
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from rlhfkit.errors import RlhfkitError
from rlhfkit.models.reward import RewardModel
from rlhfkit.rollout.forward import critic_forward, policy_forward
from rlhfkit.train import checkpoint, ppo_state
from rlhfkit.train.checkpoint import find_latest_checkpoint
from rlhfkit.train.ppo_trainer import PPOTrainer
from rlhfkit.utils import read_jsonl

# every piece of state that resume must restore is exercised: LR schedule, adaptive KL, running score moments,
# reward whitening, several prompt epochs (16 prompts, 8 per iteration), sampling and shuffling streams
STATEFUL = dict(iterations=6, save_every=2, lr_scheduler="linear", warmup_iterations=1, adaptive_kl=True,
                kl_target=0.5, kl_horizon=100.0, score_norm="running", whiten_rewards=True, entropy_coef=0.01)


class Crash(Exception):
    """A simulated kill."""


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update({f"{f.name}:{k}": v for k, v in load_file(str(f)).items()})
    return out


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys() and wa
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


@pytest.mark.parametrize("lora,critic", [(0, "separate"), (4, "separate"), (0, "shared"), (4, "shared"),
                                         (0, "warmup")])
def test_resume_after_a_crash_reproduces_the_uninterrupted_run(tmp_path, monkeypatch, lora, critic):
    # critic=shared: one optimizer (two param groups) and one schedule, the value head in the checkpoint;
    # warmup: a separate critic trained alone in iterations 1-4 (the checkpoint at 4 holds a policy optimizer
    # without state and a policy schedule not yet started; iteration 5 is the policy's schedule warm-up, 6 trains)
    shared = {"shared": dict(critic="shared", critic_init="auto"),
              "warmup": dict(critic_warmup_iterations=4)}.get(critic, {})
    full = make_config(tmp_path, output=str(tmp_path / "full"), lora_r=lora, **shared, **STATEFUL)
    PPOTrainer(full).train()

    # the same run, killed after logging iteration 5 (the last checkpoint is iteration 4)
    cfg = make_config(tmp_path, output=str(tmp_path / "crashed"), lora_r=lora, **shared, **STATEFUL)
    original_log = PPOTrainer.log

    def log_then_crash(self, step, result):
        original_log(self, step, result)
        if step == 5:
            raise Crash

    monkeypatch.setattr(PPOTrainer, "log", log_then_crash)
    with pytest.raises(Crash):
        PPOTrainer(cfg).train()
    monkeypatch.setattr(PPOTrainer, "log", original_log)
    out = Path(cfg.output)
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [1, 2, 3, 4, 5]
    assert find_latest_checkpoint(out).name == "step-00000004"
    assert not (out / "policy").exists()

    resumed = make_config(tmp_path, output=str(tmp_path / "crashed"), lora_r=lora, resume=True, **shared,
                          **STATEFUL)
    results = PPOTrainer(resumed).train()
    assert len(results) == 2  # iterations 5 and 6 only

    rows_full = read_jsonl(tmp_path / "full" / "metrics.jsonl")
    rows_resumed = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in rows_resumed] == [1, 2, 3, 4, 5, 6]
    assert without_timing(rows_resumed) == without_timing(rows_full)
    assert rows_full[-1]["objective/kl_coef"] != rows_full[0]["objective/kl_coef"]  # the controller moved
    assert rows_full[-1]["train/lr"] != rows_full[1]["train/lr"]  # the schedule moved
    assert read_jsonl(out / "samples.jsonl") == read_jsonl(tmp_path / "full" / "samples.jsonl")
    _assert_same_weights(tmp_path / "full" / "policy", out / "policy")
    if critic == "shared":
        assert not (out / "critic").exists()
        head_full = load_file(str(tmp_path / "full" / "value_head.safetensors"))
        head_resumed = load_file(str(out / "value_head.safetensors"))
        assert head_full.keys() == head_resumed.keys() == {"weight", "bias"}
        assert all(torch.equal(head_full[k], head_resumed[k]) for k in head_full)
        assert head_full["bias"].abs().item() > 0  # the head trained
    else:
        _assert_same_weights(tmp_path / "full" / "critic", out / "critic")


def test_a_kill_while_writing_a_checkpoint_leaves_the_previous_one_and_resume_works(tmp_path, monkeypatch):
    cfg = make_config(tmp_path, iterations=4, save_every=2)
    out = Path(cfg.output)
    original = checkpoint.save_state
    calls = {"n": 0}

    def dying_save_state(path, obj):
        if "step-00000004" in str(Path(path).parent.name) or ".step-00000004" in str(path):
            calls["n"] += 1
            if calls["n"] == 2:  # some files of the checkpoint are already written
                raise Crash
        original(path, obj)

    monkeypatch.setattr(checkpoint, "save_state", dying_save_state)
    with pytest.raises(Crash):
        PPOTrainer(cfg).train()
    assert calls["n"] == 2
    root = out / "checkpoints"
    assert (root / "latest").read_text().strip() == "step-00000002"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-00000002"]  # no partial folder is left
    assert find_latest_checkpoint(out).name == "step-00000002"
    rows_before = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in rows_before] == [1, 2, 3, 4]

    monkeypatch.setattr(checkpoint, "save_state", original)
    PPOTrainer(make_config(tmp_path, iterations=4, save_every=2, resume=True)).train()
    rows_after = read_jsonl(out / "metrics.jsonl")
    assert without_timing(rows_after) == without_timing(rows_before)
    assert (root / "latest").read_text().strip() == "step-00000004"
    assert (out / "policy" / "config.json").is_file()


def test_checkpoint_keeps_the_newest_ones(tmp_path):
    cfg = make_config(tmp_path, iterations=5, save_every=1, keep_checkpoints=2, sample_table_every=0)
    PPOTrainer(cfg).train()
    root = Path(cfg.output) / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-00000004", "step-00000005"]
    state = json.loads((root / "step-00000005" / "trainer_state.json").read_text())
    assert state["step"] == 5 and state["prompt_sampler"] == {"epoch": 2, "position": 8, "num_prompts": 16}


@pytest.mark.parametrize("lora", [0, 4])
def test_final_policy_and_critic_load_with_transformers(tmp_path, lora):
    cfg = make_config(tmp_path, lora_r=lora)
    trainer = PPOTrainer(cfg)
    trainer.train()
    out = Path(cfg.output)
    assert not (out / "policy" / "adapter_config.json").exists()  # LoRA merged: a plain causal LM
    policy = AutoModelForCausalLM.from_pretrained(out / "policy").eval()
    rollout, _ = trainer.rollout()
    args = (rollout.query_ids, rollout.query_mask, rollout.response_ids, rollout.response_mask)
    with torch.no_grad(), linear_terms(policy.lm_head) as terms:
        expected = policy_forward(trainer.policy, *args, temperature=1.0).logprobs
        loaded = policy_forward(policy, *args, temperature=1.0).logprobs
        # the saved (LoRA: merged) weights in float32 through the 2 decoder layers, then the log-softmax over V
        assert_within(loaded, expected, logprob_tolerance(terms[0], expected, 1.0, forward_factor(2)), "log-probs")
        initial = policy_forward(trainer.reference, *args, temperature=1.0,).logprobs \
            if lora == 0 else None
    if initial is not None:
        assert (loaded - initial).abs().max() > 1e-4  # training changed the policy
    assert AutoModelForSequenceClassification.from_pretrained(out / "critic") is not None
    critic = RewardModel.from_pretrained(out / "critic")
    with torch.no_grad(), linear_terms(critic._head()) as terms:
        values = critic_forward(critic, *args)
        # the saved (LoRA: merged) weights in float32 through the 2 decoder layers, relative to the head's terms
        assert_close_f32(values, critic_forward(trainer.critic, *args), terms[0].max(), forward_factor(2), "values")


def test_no_checkpoint_without_save_every(tmp_path):
    cfg = make_config(tmp_path)
    PPOTrainer(cfg).train()
    assert not (Path(cfg.output) / "checkpoints").exists()
    assert (Path(cfg.output) / "policy" / "config.json").is_file()


def test_a_fresh_run_refuses_an_existing_run_folder_unless_overwrite(tmp_path):
    cfg = make_config(tmp_path)
    PPOTrainer(cfg).train()
    metrics = (Path(cfg.output) / "metrics.jsonl").read_text()
    with pytest.raises(RlhfkitError, match="already holds a run.*--resume"):
        PPOTrainer(make_config(tmp_path)).train()
    assert (Path(cfg.output) / "metrics.jsonl").read_text() == metrics
    PPOTrainer(make_config(tmp_path, overwrite=True, iterations=1)).train()
    assert [r["step"] for r in read_jsonl(Path(cfg.output) / "metrics.jsonl")] == [1]


def test_resume_refuses_a_changed_configuration_or_a_missing_checkpoint(tmp_path):
    with pytest.raises(RlhfkitError, match="no checkpoint"):
        PPOTrainer(make_config(tmp_path, resume=True)).train()
    PPOTrainer(make_config(tmp_path, save_every=5)).train()  # 2 iterations: checkpointed after the last
    with pytest.raises(RlhfkitError, match="configuration differs.*kl_coef"):
        PPOTrainer(make_config(tmp_path, resume=True, save_every=5, kl_coef=0.5)).train()
    # more iterations is allowed: the run continues from iteration 3
    results = PPOTrainer(make_config(tmp_path, resume=True, save_every=5, iterations=3)).train()
    assert len(results) == 1


def test_a_checkpoint_of_the_older_format_is_refused_with_an_error_saying_so(tmp_path):
    """The format before the run layer: torch .pt state files and no checkpoint.json (docs/architecture.md)."""
    PPOTrainer(make_config(tmp_path, save_every=1)).train()
    ckpt = find_latest_checkpoint(tmp_path / "run")
    for name in ("checkpoint.json", "trainer_state.json", "trainer_state.safetensors"):
        (ckpt / name).unlink()
    torch.save({"policy": {}}, ckpt / "optimizers.pt")
    with pytest.raises(RlhfkitError, match=r"older rlhfkit format \(torch \.pt state files.*version that wrote it"):
        PPOTrainer(make_config(tmp_path, save_every=1, resume=True)).train()


def test_a_checkpoint_written_before_a_field_existed_resumes_at_that_fields_default(tmp_path):
    """A checkpoint's config.yaml without the key of a newer field (here `critic`) ran as its default does; it
    resumes under the default and is refused under another value."""
    PPOTrainer(make_config(tmp_path, save_every=1)).train()
    ckpt = find_latest_checkpoint(tmp_path / "run")
    saved = yaml.safe_load((ckpt / "config.yaml").read_text())
    del saved["critic"]
    (ckpt / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    ppo_state.check_resume_config(make_config(tmp_path, save_every=1, resume=True), ckpt)
    with pytest.raises(RlhfkitError, match=r"critic: None -> 'shared'"):
        ppo_state.check_resume_config(make_config(tmp_path, save_every=1, resume=True, critic="shared",
                                                  critic_init="auto", critic_freeze_layers=0), ckpt)


# ------------------------------------------------------------------------------------ a changed run length
@pytest.mark.parametrize("scheduler,length", [("linear", {"iterations": 4}),
                                              ("cosine", {"iterations": None, "total_episodes": 32})])
def test_resume_refuses_a_new_length_under_a_length_dependent_schedule(tmp_path, scheduler, length):
    # the checkpoint's iterations followed a schedule over 2; rebuilt over 4, iterations 3-4 would follow another
    # one (linear: iteration 3 at 1/2 of peak), so the run would match neither a 2- nor a 4-iteration run
    PPOTrainer(make_config(tmp_path, save_every=1, lr_scheduler=scheduler)).train()
    metrics = (tmp_path / "run" / "metrics.jsonl").read_text()
    new = "total_episodes=32" if "total_episodes" in length else "iterations=4"
    with pytest.raises(RlhfkitError, match=rf"from 2 iterations \(iterations=2\) to 4 \({new}\).*"
                                           rf"lr_scheduler='{scheduler}'"):
        PPOTrainer(make_config(tmp_path, save_every=1, lr_scheduler=scheduler, resume=True, **length)).train()
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == metrics  # nothing was written
    # the same length written another way is the same run: 2 iterations = 16 episodes of 8
    ckpt = find_latest_checkpoint(tmp_path / "run")
    ppo_state.check_resume_config(make_config(tmp_path, save_every=1, lr_scheduler=scheduler, resume=True,
                                              iterations=None, total_episodes=16), ckpt)


def test_a_constant_schedule_with_warmup_resumed_longer_equals_the_longer_run(tmp_path):
    """constant_with_warmup does not depend on the run's length: a 2-iteration run resumed to 3 iterations ends
    exactly as a 3-iteration run, so `--resume` may change the length (docs/ppo.md)."""
    common = dict(save_every=1, lr_scheduler="constant", warmup_iterations=2, learning_rate=1e-3)
    PPOTrainer(make_config(tmp_path, output=str(tmp_path / "long"), iterations=3, **common)).train()
    PPOTrainer(make_config(tmp_path, output=str(tmp_path / "cut"), iterations=2, **common)).train()
    PPOTrainer(make_config(tmp_path, output=str(tmp_path / "cut"), iterations=3, resume=True, **common)).train()
    rows_long = read_jsonl(tmp_path / "long" / "metrics.jsonl")
    assert without_timing(read_jsonl(tmp_path / "cut" / "metrics.jsonl")) == without_timing(rows_long)
    assert [r["train/lr"] for r in rows_long] == [0.0, 5e-4, 1e-3]  # the warm-up, then the constant peak
    _assert_same_weights(tmp_path / "long" / "policy", tmp_path / "cut" / "policy")


def test_unset_bf16_and_old_logprobs_resume_at_the_checkpoints_values(tmp_path):
    # --bf16 unset (None) is the device's default and --old_logprobs auto the precision's; config.yaml records the
    # resolved values, and a resumed run that leaves them unset takes the checkpoint's, whichever they are, through
    # the trainer itself (before it resolves anything: the autocast follows); an explicit value that differs is
    # still a changed setting
    PPOTrainer(make_config(tmp_path, save_every=1, old_logprobs="auto")).train()
    ckpt = find_latest_checkpoint(tmp_path / "run")
    saved = yaml.safe_load((ckpt / "config.yaml").read_text())
    assert (saved["bf16"], saved["old_logprobs"]) == (False, "rollout")  # the CPU's resolved defaults, recorded
    (ckpt / "config.yaml").write_text(yaml.safe_dump({**saved, "bf16": True, "old_logprobs": "recompute"},
                                                     sort_keys=False))
    cfg = make_config(tmp_path, save_every=1, resume=True, old_logprobs="auto")
    assert (cfg.bf16, cfg.old_logprobs) == (None, "auto")
    trainer = PPOTrainer(cfg)
    assert (cfg.bf16, cfg.old_logprobs, trainer.autocast_dtype) == (True, "recompute", torch.bfloat16)
    assert trainer.open_output() == 3  # the resume check passes (nothing differs): after iteration 2 of 2
    for explicit, message in (({"bf16": False}, r"bf16: True -> False"),
                              ({"old_logprobs": "rollout"}, r"old_logprobs: 'recompute' -> 'rollout'")):
        with pytest.raises(RlhfkitError, match=message):
            PPOTrainer(make_config(tmp_path, save_every=1, resume=True, **explicit)).open_output()
