"""One rendering rule for reward-model inputs: PPO scores a response exactly as `rlhfkit score` scores its text
(EOS-, stop-id- and stop-string-ended responses end with the RM's EOS, as in RM training; a truncated one is scored
as it is), and a reward model trained by TRL's RewardTrainer (pad == EOS) scores in `rlhfkit score`, `rm eval` and
PPO exactly as plain transformers scores TRL's own rendering of the texts."""

from __future__ import annotations

import json

import pytest
import torch
from ppo_helpers import make_config, make_tokenizer, one_thread  # noqa: F401 (autouse)
from tolerances import EPS32, assert_close_f32, assert_within, forward_factor, linear_terms
from transformers import AutoModelForSequenceClassification, LlamaConfig, LlamaForSequenceClassification

from rlhfkit.cli import main
from rlhfkit.data.preference import parse_preferences
from rlhfkit.data.tokenize import left_pad, right_pad
from rlhfkit.models.reward import RewardModel, reward_pad_token_id
from rlhfkit.rollout.sampling import Rollout
from rlhfkit.rollout.scoring import RMReward
from rlhfkit.train.ppo_trainer import PPOTrainer
from rlhfkit.train.rm_eval import load_scoring_model, score_pair_items, tokenize_pairs
from rlhfkit.utils import read_jsonl

EOS, STOP_ID, STOP_STRING = 1, 3, "w8 w9"
# response ids of four rollout rows and whether each stopped: EOS, the extra stop id, the stop string, truncated
RESPONSES = [[10, 11, EOS], [10, STOP_ID], [12, 8, 9], [12, 13, 14, 15]]
STOPPED = [True, True, True, False]


def tiny_rm_folder(path, tokenizer, vocab: int, seed: int = 0):
    """A random tiny Llama reward model (built from a config, wide initialisation so scores differ) saved by rlhfkit."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, initializer_range=0.3, num_labels=1,
                         pad_token_id=reward_pad_token_id(tokenizer), eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=None)
    RewardModel(LlamaForSequenceClassification(config).eval(), "decoder", "last", ["score"], [1.0]).save_pretrained(
        path, tokenizer)
    return path


def score_cli(tmp_path, model, prompts, responses) -> list[float]:
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in zip(prompts, responses)))
    assert main(["score", "--model", str(model), "--data", str(data), "--output", str(tmp_path / "s.jsonl"),
                 "--batch_size", "3"]) == 0
    return [row["score"] for row in read_jsonl(tmp_path / "s.jsonl")]


def test_ppo_scores_ended_responses_as_rlhfkit_score_scores_their_text(tmp_path):
    rm_dir = tiny_rm_folder(tmp_path / "rm", make_tokenizer(), vocab=32)
    trainer = PPOTrainer(make_config(tmp_path, reward_model=[str(rm_dir)], stop_token_ids=[STOP_ID],
                                     stop_strings=[STOP_STRING]))
    query_ids, query_mask = left_pad(trainer.prompt_ids[:4], trainer.tokenizer.pad_token_id)
    response_ids, response_mask = right_pad(RESPONSES, trainer.tokenizer.pad_token_id)
    rollout = Rollout(query_ids, query_mask, response_ids, response_mask, torch.zeros(response_ids.shape),
                      torch.tensor(STOPPED))
    assert trainer.tokenizer.decode(RESPONSES[2]).endswith(STOP_STRING)
    assert isinstance(trainer.reward, RMReward) and trainer.reward.use_ids
    with linear_terms(trainer.reward.model._head()) as terms:
        ppo, prompts, responses = trainer.raw_scores(rollout)  # PPO's own scoring call (the id path)
    # the largest Σ|terms| of the head's outputs, for every row (the packed micro-batch runs the head once on all)
    ppo, scale = ppo.cpu(), terms[0].flatten().amax().expand(4)
    assert trainer.reward.packing  # the trainer's packing=auto: packed micro-batches
    by_text = RMReward(rm_dir, trainer.tokenizer, force_text=True, packing=True)(
        prompts, responses, query_ids, query_mask, response_ids, response_mask, rollout.stopped)
    # the text path rebuilds the id path's very rows: the same batch through the same float32 forward
    torch.testing.assert_close(by_text, ppo, rtol=0, atol=0)
    scored = torch.tensor(score_cli(tmp_path, rm_dir, prompts, responses))
    # ended rows (EOS, stop id, stop string) = `rlhfkit score` of the same prompt/response text (batches of 3):
    # float32 through the 2 decoder layers in another batch shape, relative to the head's terms
    assert_close_f32(ppo[:3], scored[:3], scale[:3], forward_factor(2), "score")
    # the truncated row is scored as it is (no EOS: it is not complete), so not as `score` (which appends EOS)
    rm = RewardModel.from_pretrained(rm_dir)
    ids = torch.tensor([trainer.prompt_ids[3] + RESPONSES[3]])
    with torch.no_grad():
        as_is = rm(ids, torch.ones_like(ids, dtype=torch.bool)).scores[0]
    assert_close_f32(ppo[3], as_is, scale[3], forward_factor(2), "as it is, alone")  # the row alone, as above
    assert abs(float(ppo[3]) - float(scored[3])) > 1e-3


# ---------------------------------------------------------------------------------------------- TRL
@pytest.fixture(scope="module")
def trl_run(tmp_path_factory):
    """Two steps of TRL 1.9 RewardTrainer on a tiny Llama (tokenizer pad == EOS), saved; and TRL's own rendering
    of its training pairs (``train_dataset``: text + EOS text, tokenised as one string)."""
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    root = tmp_path_factory.mktemp("trl")
    tokenizer = make_tokenizer()
    tokenizer.pad_token = tokenizer.eos_token  # as for SmolLM2: pad == EOS
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, initializer_range=0.3, num_labels=1,
                         pad_token_id=EOS, eos_token_id=EOS, bos_token_id=None)
    rows = [{"prompt": "w4 w5 w6", "chosen": " w7 w7 w8", "rejected": " w20 w21"},
            {"prompt": "w10", "chosen": " w7 w12 w13 w14", "rejected": " w15"},
            {"prompt": "w16 w17", "chosen": " w7", "rejected": " w18 w19 w22 w23"},
            {"prompt": "w24 w25 w26 w27", "chosen": " w28 w7", "rejected": " w29 w30 w31"}]
    args = trl.RewardConfig(output_dir=str(root / "trainer"), max_steps=2, per_device_train_batch_size=2,
                            learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
                            logging_steps=1, dataloader_num_workers=0)
    trainer = trl.RewardTrainer(model=LlamaForSequenceClassification(config), args=args,
                                train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    trainer.train()
    trainer.save_model(str(root / "rm"))
    # TRL's Trainer left its accelerate state (bf16 where the CPU supports it) in this process; rlhfkit's own
    # commands refuse such a state (`train.engine.processes.make_accelerator`), and a user's fresh process has none
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    rendered = trainer.train_dataset
    # TRL appended the EOS text to every side
    assert all(ids[-1] == EOS for ids in list(rendered["chosen_ids"]) + list(rendered["rejected_ids"]))
    batch = trainer.data_collator([rendered[i] for i in range(len(rows))])  # TRL's padded training batch
    hf = AutoModelForSequenceClassification.from_pretrained(root / "rm").eval()
    assert hf.config.pad_token_id == EOS
    with torch.no_grad(), linear_terms(hf.score) as terms:
        logits = hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0]
    scale = terms[0].flatten(1).amax(1)  # per row (chosen rows, then rejected), the largest Σ|terms| of the head
    return root / "rm", rows, logits[:len(rows)], logits[len(rows):], scale


def test_trl_reward_model_scores_as_plain_transformers_in_score_rm_eval_and_ppo(trl_run, tmp_path):
    folder, rows, chosen, rejected, scale = trl_run
    assert not (folder / "rlhfkit.json").exists()
    assert RewardModel.from_pretrained(folder).convention == "hf"
    prompts = [r["prompt"] for r in rows] * 2
    responses = [r["chosen"] for r in rows] + [r["rejected"] for r in rows]
    want = torch.cat([chosen, rejected])
    # every path below vs transformers on TRL's batch: float32 through the 2 decoder layers in other batch shapes
    # (and rlhfkit's forward), relative to the head's terms of each row
    factor, n = forward_factor(2), len(rows)
    # rlhfkit score
    assert_close_f32(torch.tensor(score_cli(tmp_path, folder, prompts, responses)), want, scale, factor, "score")
    # rm eval: per-pair scores (its own tokenising and batching), and the CLI's means
    model, tokenizer = load_scoring_model(str(folder))
    examples = parse_preferences(rows, "pairs")
    items, _ = tokenize_pairs(False, tokenizer, examples, 64, "fail", convention=model.convention)
    _, got_chosen, got_rejected = score_pair_items(model, items, batch_size=3)
    assert_close_f32(got_chosen, chosen, scale[:n], factor, "rm eval chosen")
    assert_close_f32(got_rejected, rejected, scale[n:], factor, "rm eval rejected")
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["rm", "eval", "--model", str(folder), "--data", str(data), "--output", str(tmp_path / "e.json")]) == 0
    metrics = json.loads((tmp_path / "e.json").read_text())
    # the means of those rows: the mean of their bounds (float64 means of 4 float32 numbers are exact)
    assert_within(metrics["chosen_mean"], float(chosen.double().mean()), factor * EPS32 * float(scale[:n].mean()),
                  "chosen_mean")
    assert_within(metrics["rejected_mean"], float(rejected.double().mean()),
                  factor * EPS32 * float(scale[n:].mean()), "rejected_mean")
    # PPO: RMReward on ended responses of a policy with the same vocabulary (its own pad id)
    policy_tokenizer = make_tokenizer()
    source = RMReward(folder, policy_tokenizer)
    assert not source.use_ids  # a foreign model reads TRL's rendering of the text
    q_ids, q_mask = left_pad([policy_tokenizer(p)["input_ids"] for p in prompts], policy_tokenizer.pad_token_id)
    r_ids, r_mask = right_pad([policy_tokenizer(r)["input_ids"] + [EOS] for r in responses],
                              policy_tokenizer.pad_token_id)
    ppo = source(prompts, responses, q_ids, q_mask, r_ids, r_mask, torch.ones(len(prompts), dtype=torch.bool))
    assert_close_f32(ppo, want, scale, factor, "ppo")
