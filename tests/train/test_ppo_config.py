"""PPOConfig validation and the ``rlhfkit ppo`` command end to end."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import yaml
from ppo_helpers import REWARD, make_policy_folder, make_prompts, one_thread  # noqa: F401  (autouse fixture)

from rlhfkit.cli import main
from rlhfkit.errors import RlhfkitError
from rlhfkit.train.ppo_config import DEFAULT_ITERATIONS, PPOConfig
from rlhfkit.utils import read_jsonl

REQUIRED = dict(policy="p", reward_model=["m:f"], prompts="x.jsonl", output="out")


def test_every_field_is_documented():
    for f in dataclasses.fields(PPOConfig):
        assert f.metadata.get("help"), f.name


def test_iterations_total_episodes_and_defaults():
    assert PPOConfig(**REQUIRED).num_iterations == DEFAULT_ITERATIONS
    assert PPOConfig(**REQUIRED, iterations=7).num_iterations == 7
    # ceil(100 / 16) = 7 iterations cover 100 episodes
    assert PPOConfig(**REQUIRED, total_episodes=100, rollout_batch_size=16).num_iterations == 7
    assert PPOConfig(**REQUIRED, total_episodes=96, rollout_batch_size=16).num_iterations == 6
    cfg = PPOConfig(**REQUIRED, learning_rate=2e-5)
    assert cfg.value_learning_rate == 2e-5
    assert PPOConfig(**REQUIRED, critic_learning_rate=1e-4).value_learning_rate == 1e-4
    assert PPOConfig(**{**REQUIRED, "reward_model": "m:f"}).reward_model == ["m:f"]


@pytest.mark.parametrize("bad,match", [
    ({"clip_range": 0.0}, "clip_range"),
    ({"kl_estimator": "k2"}, "kl_estimator"),
    ({"score_norm": "zscore"}, "score_norm"),
    ({"missing_stop_mode": "drop"}, "missing_stop_mode"),
    ({"critic_init": "random"}, "critic_init"),
    ({"iterations": 3, "total_episodes": 10}, "either iterations or total_episodes"),
    ({"iterations": 0}, "iterations"),
    ({"reward_weights": [1.0, 2.0]}, "one weight per source"),
    ({"rollout_batch_size": 10, "num_minibatches": 4}, "divisible"),
    ({"gamma": 1.5}, "gamma"),
    ({"gae_lambda": -0.1}, "gae_lambda"),
    ({"top_p": 0.0}, "top_p"),
    ({"temperature": 0.0}, "temperature"),
    ({"adaptive_kl": True, "kl_target": 0.0}, "kl_target"),
    ({"adaptive_kl": True, "kl_coef": 0.0}, "kl_coef"),
    ({"score_norm": "whiten", "rollout_batch_size": 1, "num_minibatches": 1}, "rollout_batch_size × samples_per_prompt >= 2"),
    ({"resume": True, "overwrite": True}, "exclude"),
    ({"lr_scheduler": "step"}, "lr_scheduler"),
    ({"stop_strings": [""]}, "stop_strings"),
    ({"log_every": 0}, "log_every"),
    ({"missing_stop_penalty": float("nan")}, "missing_stop_penalty"),
])
def test_invalid_values_are_rejected(bad, match):
    with pytest.raises(RlhfkitError, match=match):
        PPOConfig(**{**REQUIRED, **bad})


# ------------------------------------------------------------------------------------ the CLI
def _setup(tmp_path: Path) -> tuple[Path, Path]:
    policy = make_policy_folder(tmp_path / "sft")
    prompts = make_prompts(tmp_path / "prompts.jsonl")
    config = tmp_path / "ppo.yaml"
    config.write_text(yaml.safe_dump({
        "policy": str(policy), "reward_model": [REWARD], "prompts": str(prompts), "output": str(tmp_path / "run"),
        "iterations": 2, "rollout_batch_size": 4, "max_new_tokens": 5, "temperature": 1.0, "ppo_epochs": 2,
        "num_minibatches": 2, "micro_batch_size": 1, "learning_rate": 1e-3, "critic_init": "policy",
        "sample_table_every": 1, "save_every": 1,
    }))
    return config, tmp_path / "run"


def test_cli_runs_ppo_end_to_end_from_a_yaml_config(tmp_path, capsys):
    config, out = _setup(tmp_path)
    assert main(["ppo", "--config", str(config), "--kl-coef", "0.1"]) == 0
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    for key in ("objective/kl", "objective/kl_coef", "objective/scores", "objective/rlhf_reward",
                "objective/non_score_reward", "objective/entropy", "policy/approx_kl", "policy/clipfrac",
                "policy/ratio_mean", "policy/ratio_var", "policy/entropy", "loss/policy", "loss/value",
                "loss/entropy", "val/clipfrac", "val/explained_variance", "val/mean", "returns/mean",
                "response/length_mean", "response/stop_rate", "train/lr", "time/rollout", "time/forward",
                "time/update", "time/iteration", "throughput/tokens_per_s"):
        assert key in rows[0], key
    assert rows[0]["objective/kl_coef"] == 0.1  # the flag overrides the YAML default
    samples = read_jsonl(out / "samples.jsonl")
    assert [s["step"] for s in samples] == [1] * 4 + [2] * 4
    assert {"prompt", "response", "score", "stopped"} <= samples[0].keys()
    assert any((out / "tensorboard").iterdir())
    assert (out / "policy" / "config.json").is_file() and (out / "critic" / "config.json").is_file()
    assert yaml.safe_load((out / "config.yaml").read_text())["kl_coef"] == 0.1
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step-00000001", "step-00000002"]

    # a second fresh run into the same folder is refused, nothing is touched; --resume continues it
    before = (out / "metrics.jsonl").read_text()
    assert main(["ppo", "--config", str(config), "--kl-coef", "0.1"]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (out / "metrics.jsonl").read_text() == before
    assert main(["ppo", "--config", str(config), "--kl-coef", "0.1", "--resume", "--iterations", "3"]) == 0
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [1, 2, 3]


@pytest.mark.parametrize("argv,message", [
    (["--clip_range", "-1"], "clip_range"),
    (["--kl_estimator", "nope"], "kl_estimator"),
    (["--no-such-flag", "1"], "no-such-flag"),
    (["--prompts", "missing.jsonl"], "missing.jsonl"),
    (["--reward_model", "no_such_module_xyz:fn"], "no_such_module_xyz"),
    (["--policy", "/nonexistent/model"], "does not exist"),
])
def test_cli_bad_configuration_exits_2_and_writes_nothing(tmp_path, capsys, argv, message):
    config, out = _setup(tmp_path)
    assert main(["ppo", "--config", str(config), *argv]) == 2
    err = capsys.readouterr().err
    assert "rlhfkit: error:" in err and message in err
    assert "Traceback" not in err
    assert not out.exists()


def test_cli_unknown_yaml_key_exits_2(tmp_path, capsys):
    config, out = _setup(tmp_path)
    data = yaml.safe_load(config.read_text())
    data["learning_rat"] = 1.0
    config.write_text(yaml.safe_dump(data))
    assert main(["ppo", "--config", str(config)]) == 2
    assert "learning_rat" in capsys.readouterr().err
    assert not out.exists()


# ------------------------------------------------------------------------------------ models and logging
def test_critic_starts_from_the_reward_model_folder_and_lora_shares_the_reference(tmp_path):
    import torch
    from ppo_helpers import make_config, make_tokenizer

    from rlhfkit.models.reward import RewardModel
    from rlhfkit.train.ppo_trainer import PPOTrainer

    make_config(tmp_path)
    torch.manual_seed(5)
    rm = RewardModel.from_backbone(tmp_path / "sft")
    rm.save_pretrained(tmp_path / "rm", make_tokenizer())
    trainer = PPOTrainer(make_config(tmp_path, reward_model=[str(tmp_path / "rm")], critic_init="auto", lora_r=4))
    head = trainer.critic.model.score.weight
    assert torch.equal(head, rm.model.score.weight)  # the RM's trained head, not a fresh one
    assert trainer.reference is trainer.policy  # LoRA: adapters off = reference, no second copy
    result = trainer.iteration(1)
    assert result.stats["objective/kl"] == 0.0
    assert result.stats["objective/scores_std"] > 0  # scores come from the reward model
    with pytest.raises(RlhfkitError, match="critic_init=reward needs a reward-model folder"):
        PPOTrainer(make_config(tmp_path, critic_init="reward"))


def _other_reward_model(tmp_path: Path, variant: str) -> Path:
    """A reward-model folder the critic cannot read the policy's ids with: a smaller vocabulary (16 tokens vs
    32), the same 32 tokens under other ids (the words in reverse order), or an encoder with the policy's tokens."""
    from ppo_helpers import WORDS, make_tokenizer
    from transformers import BertConfig, BertModel

    from rlhfkit.models.reward import RewardModel

    backbone, folder = tmp_path / f"{variant}_backbone", tmp_path / f"{variant}_rm"
    if variant == "encoder":
        tok = make_tokenizer()
        torch.manual_seed(1)
        config = BertConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=64, pad_token_id=0)
        BertModel(config).save_pretrained(backbone)
    else:
        tok = make_tokenizer(WORDS[:13] if variant == "smaller" else WORDS[::-1])
        make_policy_folder(backbone, seed=1, vocab=len(tok))
    RewardModel.from_backbone(backbone, kind="encoder" if variant == "encoder" else "decoder",
                              tokenizer=tok).save_pretrained(folder, tok)
    return folder


@pytest.mark.parametrize("variant,reason", [("smaller", "16 tokens"), ("permuted", "vocabulary"),
                                            ("encoder", "encoder")])
def test_a_reward_model_that_cannot_read_the_policys_ids_is_not_the_critic(tmp_path, caplog, variant, reason):
    from ppo_helpers import make_config

    from rlhfkit.train.ppo_trainer import PPOTrainer

    make_config(tmp_path)
    rm = _other_reward_model(tmp_path, variant)
    # auto: the critic is the policy's weights plus a new (zero) value head, and a warning says why
    with caplog.at_level("WARNING", logger="rlhfkit.train.ppo_trainer"):
        trainer = PPOTrainer(make_config(tmp_path, reward_model=[str(rm)], critic_init="auto"))
    assert str(rm) in caplog.text and reason in caplog.text and "starts from the policy" in caplog.text
    critic, policy = trainer.critic.model, trainer.policy
    backbone = critic.model.state_dict()
    assert backbone.keys() == policy.model.state_dict().keys()
    assert all(torch.equal(backbone[k], v) for k, v in policy.model.state_dict().items())
    assert not critic.score.weight.any()
    trainer.iteration(1)  # the critic reads the policy's ids (a 16-row embedding read by 32 ids would fail)
    # reward: an error naming the folder and the reason, before anything is written
    with pytest.raises(RlhfkitError, match=f"{rm}.*{reason}.*critic_init=policy"):
        PPOTrainer(make_config(tmp_path, reward_model=[str(rm)], critic_init="reward", output=str(tmp_path / "r")))
    assert not (tmp_path / "r").exists()


def test_log_every_writes_every_nth_row_and_the_last(tmp_path):
    from ppo_helpers import make_config

    from rlhfkit.train.ppo_trainer import PPOTrainer

    cfg = make_config(tmp_path, iterations=5, log_every=2, sample_table_every=3)
    PPOTrainer(cfg).train()
    assert [r["step"] for r in read_jsonl(Path(cfg.output) / "metrics.jsonl")] == [2, 4, 5]
    assert {r["step"] for r in read_jsonl(Path(cfg.output) / "samples.jsonl")} == {3}


def test_monitor_rewards_are_logged_and_never_trained_on(tmp_path):
    from ppo_helpers import length_reward, make_config, trainable, without_timing

    from rlhfkit.train.ppo_trainer import PPOTrainer

    plain = PPOTrainer(make_config(tmp_path / "a", iterations=2, sample_table_rows=8))
    plain.train()
    watched = PPOTrainer(make_config(tmp_path / "b", iterations=2, sample_table_rows=8,
                                     monitor_rewards=["ppo_helpers:length_reward"]))
    watched.train()
    rows_a = read_jsonl(Path(plain.cfg.output) / "metrics.jsonl")
    rows_b = read_jsonl(Path(watched.cfg.output) / "metrics.jsonl")
    # the monitor is the mean of length_reward over each iteration's rollouts (all 8 rows are in samples.jsonl)
    samples = read_jsonl(Path(watched.cfg.output) / "samples.jsonl")
    for row in rows_b:
        responses = [s["response"] for s in samples if s["step"] == row["step"]]
        assert len(responses) == 8
        expected = sum(length_reward([], responses)) / 8
        assert row["monitor/length_reward"] == expected  # multiples of 1/4: their float32 sum and / 8 are exact
    # and it changes nothing else: same metrics and the same trained weights as the run without it
    assert without_timing([{k: v for k, v in r.items() if not k.startswith("monitor/")} for r in rows_b]) == \
        without_timing(rows_a)
    wa, wb = trainable(plain.policy), trainable(watched.policy)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_frozen_layers_stay_put_and_upper_layers_train(tmp_path):
    from ppo_helpers import make_config

    from rlhfkit.train.ppo_trainer import PPOTrainer

    trainer = PPOTrainer(make_config(tmp_path, iterations=2, freeze_layers=1, critic_freeze_layers=2))
    before_p = {n: p.detach().clone() for n, p in trainer.policy.named_parameters()}
    before_c = {n: p.detach().clone() for n, p in trainer.critic.named_parameters()}
    trainer.train()
    after_p = dict(trainer.policy.named_parameters())
    after_c = dict(trainer.critic.named_parameters())

    def moved(before, after, key):
        return {n for n in before if key(n) and not torch.equal(before[n], after[n].detach())}

    # policy: embeddings and block 0 frozen; block 1 trains
    assert not moved(before_p, after_p, lambda n: "embed_tokens" in n or ".layers.0." in n)
    assert moved(before_p, after_p, lambda n: ".layers.1." in n)
    # critic: both blocks and the embeddings frozen, only the final norm and the value head move
    assert not moved(before_c, after_c, lambda n: "embed_tokens" in n or ".layers." in n)
    assert moved(before_c, after_c, lambda n: "score" in n)
    with pytest.raises(RlhfkitError, match="cannot freeze 5 layers"):
        PPOTrainer(make_config(tmp_path / "b", freeze_layers=5))
