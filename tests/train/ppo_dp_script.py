"""One PPO learning step (steps 2-5, the rollout statistics and the KL controller update) on a fixed global
rollout of 8 rows; run with one process (plain python) or under ``accelerate launch --num_processes 2``. Each
process takes its share of the rows; process 0 writes the new weights and the statistics to ``OUT``. Usage: ``ppo_dp_script.py TMP OUT [CRITIC]`` (TMP holds sft/ and prompts.jsonl; CRITIC ``separate`` (default) or
``shared``: a value head on the policy, given random weights so that the value loss reaches the trunk; ``none``:
no critic, ``advantage_estimator=rloo`` with 2 samples per prompt (the 8 rows are 4 groups of 2, each process
holds 2 whole groups), the KL in the loss and ``loss_aggregation=seq_mean_token_mean``, asymmetric and dual
clip on)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ppo_helpers import make_config, trainable  # noqa: E402

from rlhfkit.rollout.sampling import Rollout  # noqa: E402
from rlhfkit.train.ppo_trainer import PPOTrainer  # noqa: E402

ROWS = 8


def fixed_rollout(pad: int) -> tuple[Rollout, torch.Tensor]:
    """8 prompts of 2-6 tokens (left-padded) and responses of 1-7 tokens (right-padded), from a fixed seed."""
    g = torch.Generator().manual_seed(123)
    q_len = [2, 6, 3, 4, 5, 2, 6, 3]
    r_len = [7, 1, 4, 7, 3, 6, 2, 5]
    P, T = max(q_len), max(r_len)
    query_ids = torch.full((ROWS, P), pad)
    query_mask = torch.zeros(ROWS, P, dtype=torch.bool)
    response_ids = torch.full((ROWS, T), pad)
    response_mask = torch.zeros(ROWS, T, dtype=torch.bool)
    for b in range(ROWS):
        query_ids[b, P - q_len[b]:] = torch.randint(3, 32, (q_len[b],), generator=g)
        query_mask[b, P - q_len[b]:] = True
        response_ids[b, :r_len[b]] = torch.randint(3, 32, (r_len[b],), generator=g)
        response_mask[b, :r_len[b]] = True
    stopped = torch.tensor([False, True, True, False, True, False, True, True])
    rollout = Rollout(query_ids, query_mask, response_ids, response_mask, torch.zeros(ROWS, T), stopped)
    raw_scores = torch.randn(ROWS, generator=g)
    return rollout, raw_scores


def main(tmp: Path, out: Path, critic: str = "separate") -> None:
    torch.set_num_threads(1)
    shared = critic == "shared"
    extra = {"critic": "shared", "critic_init": "auto"} if shared else {}
    if critic == "none":
        extra = {"critic_init": "auto", "advantage_estimator": "rloo", "samples_per_prompt": 2, "kl_in": "loss",
                 "loss_aggregation": "seq_mean_token_mean", "clip_range_low": 0.1, "clip_range_high": 0.3,
                 "dual_clip": 2.0}
    prompts = ROWS // 2 if critic == "none" else ROWS
    cfg = make_config(tmp, output=str(out / "run"), rollout_batch_size=prompts, ppo_epochs=1, num_minibatches=1,
                      **extra, micro_batch_size=2, score_norm="whiten", whiten_rewards=True, missing_stop_penalty=1.0,
                      missing_stop_mode="subtract", kl_coef=0.2, entropy_coef=0.01, kl_estimator="mse",
                      adaptive_kl=True, kl_target=0.5, kl_horizon=100.0)
    trainer = PPOTrainer(cfg)
    # a policy that differs from the reference (same perturbation on every process), so the KL part is not zero
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in trainer.policy.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
        if shared:  # a zero head would send the value loss no gradient into the trunk
            for p in trainer.critic.parameters():
                p.copy_(torch.randn(p.shape, generator=g) / 6.0)
    # SGD: the new weights show the gradient itself (Adam's first step is blind to a gradient scale error)
    policy_params = [p for p in trainer.policy.parameters() if p.requires_grad]
    critic_params = [p for p in trainer.critic.parameters() if p.requires_grad] if trainer.critic is not None else []
    if trainer.critic is None:
        trainer.policy_optimizer = torch.optim.SGD(policy_params, lr=0.5)
    elif shared:  # one optimizer over policy and head (critic_optimizer None: one joint clip, one step)
        trainer.policy_optimizer = torch.optim.SGD([{"params": policy_params}, {"params": critic_params}], lr=0.5)
    else:
        trainer.policy_optimizer = torch.optim.SGD(policy_params, lr=0.5)
        trainer.critic_optimizer = torch.optim.SGD(critic_params, lr=0.5)
        trainer.critic_scheduler = torch.optim.lr_scheduler.ConstantLR(trainer.critic_optimizer, factor=1.0)
    trainer.policy_scheduler = torch.optim.lr_scheduler.ConstantLR(trainer.policy_optimizer, factor=1.0)
    trainer.update_settings.max_grad_norm = None
    rollout, raw_scores = fixed_rollout(trainer.tokenizer.pad_token_id)
    n, rank = ROWS // trainer.dist.world_size, trainer.dist.rank
    local = Rollout(*(t[rank * n:(rank + 1) * n] for t in rollout))
    stats, history = trainer.learn(local, raw_scores[rank * n:(rank + 1) * n])
    if trainer.dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_file(trainable(trainer.policy), str(out / "policy.safetensors"))
        if trainer.critic is not None:
            save_file(trainable(trainer.critic), str(out / "critic.safetensors"))
        (out / "stats.json").write_text(json.dumps({"world_size": trainer.dist.world_size, "update": history[0],
                                                    "rollout": stats, "kl_coef": trainer.kl_controller.value}))
    trainer.dist.barrier()
    if trainer.dist.distributed:  # an orderly gloo shutdown (exiting with the group alive aborted rank 1 once)
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), *sys.argv[3:])
