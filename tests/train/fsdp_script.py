"""The FSDP2 test scripts, run under ``torchrun --nproc_per_node 2`` (CPU, gloo) by ``test_fsdp.py``.

``fsdp_script.py ppo-step TMP OUT MODE``: one PPO learning step on the fixed 8-row rollout of `ppo_dp_script`
(steps 2-5), SGD at lr 0.5, no gradient clipping, ``freeze_layers=1``; MODE ``dp`` (plain modules, `sum_grads`) or
``fsdp`` (``--fsdp``), ``-lora`` appended: LoRA adapters of rank
4 instead of the frozen block (peft's ``disable_adapter`` sets its adapters trainable again on exit, so LoRA and
``freeze_layers`` do not mix: the LoRA weights of a frozen block train after the first reference pass). Process 0 writes the policy's and critic's full trainable weights and the update stats.

``fsdp_script.py memory OUT MODE``: the per-process bytes of parameters, gradients and AdamW states of a Llama
(hidden 64, 4 layers, vocabulary 1000) after one optimizer step, MODE ``ddp`` (replicated) or ``fsdp``; every
process writes its ``OUT/MODE-rank<r>.json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ppo_dp_script import ROWS, fixed_rollout  # noqa: E402
from ppo_helpers import make_config, trainable  # noqa: E402

from rlhfkit.rollout.sampling import Rollout  # noqa: E402
from rlhfkit.train.engine import sharding  # noqa: E402
from rlhfkit.train.ppo_trainer import PPOTrainer  # noqa: E402


def _perturb(params, g: torch.Generator) -> None:
    """Add 0.05·N(0, 1) to every parameter, drawn at its full shape on every process (a sharded one takes its
    shard of the same draw)."""
    from torch.distributed.tensor import distribute_tensor

    with torch.no_grad():
        for p in params:
            noise = 0.05 * torch.randn(p.shape, generator=g)
            p.add_(distribute_tensor(noise, p.device_mesh, p.placements) if sharding.is_sharded_param(p) else noise)


def ppo_step(tmp: Path, out: Path, mode: str) -> None:
    torch.set_num_threads(1)
    mode, _, lora = mode.partition("-")
    cfg = make_config(tmp, output=str(out / "run"), rollout_batch_size=ROWS, ppo_epochs=1, num_minibatches=1,
                      micro_batch_size=2, score_norm="whiten", kl_coef=0.2, entropy_coef=0.01,
                      freeze_layers=0 if lora else 1,
                      reuse_frozen_trunk=False, max_grad_norm=None, fsdp=mode == "fsdp",
                      lora_r=4 if lora else 0)
    trainer = PPOTrainer(cfg)
    assert sharding.is_sharded(trainer.policy) == (mode == "fsdp") == sharding.is_sharded(trainer.critic)
    _perturb(trainer.policy.parameters(), torch.Generator().manual_seed(7))
    policy_params = [p for p in trainer.policy.parameters() if p.requires_grad]
    critic_params = [p for p in trainer.critic.parameters() if p.requires_grad]
    trainer.policy_optimizer = torch.optim.SGD(policy_params, lr=0.5)
    trainer.critic_optimizer = torch.optim.SGD(critic_params, lr=0.5)
    trainer.policy_scheduler = torch.optim.lr_scheduler.ConstantLR(trainer.policy_optimizer, factor=1.0)
    trainer.critic_scheduler = torch.optim.lr_scheduler.ConstantLR(trainer.critic_optimizer, factor=1.0)
    rollout, raw_scores = fixed_rollout(trainer.tokenizer.pad_token_id)
    n, rank = ROWS // trainer.dist.world_size, trainer.dist.rank
    local = Rollout(*(t[rank * n:(rank + 1) * n] for t in rollout))
    stats, history = trainer.learn(local, raw_scores[rank * n:(rank + 1) * n])
    policy, critic = sharding.full_copy(trainer.policy, trainer.dist), sharding.full_copy(trainer.critic, trainer.dist)
    if trainer.dist.is_main:
        from safetensors.torch import save_file

        out.mkdir(parents=True, exist_ok=True)
        save_file(trainable(policy), str(out / "policy.safetensors"))
        save_file(trainable(critic), str(out / "critic.safetensors"))
        (out / "stats.json").write_text(json.dumps({"update": history[0], "rollout": stats}))
    trainer.dist.barrier()
    torch.distributed.destroy_process_group()


def local_bytes(tensors) -> int:
    """Bytes this process holds of ``tensors`` (a sharded tensor: its local shard)."""
    total = 0
    for t in tensors:
        local = t.to_local() if sharding.is_sharded_param(t) else t
        total += local.numel() * local.element_size()
    return total


def memory(out: Path, mode: str) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlhfkit.train.engine.optim import ModuleGroup, build_optimizer
    from rlhfkit.train.engine.processes import Processes

    torch.set_num_threads(1)
    procs = Processes.start("memory")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    model = procs.shard(LlamaForCausalLM(config), mode == "fsdp", reduce="mean")
    model = procs.wrap(model)
    optimizer = build_optimizer([ModuleGroup("model", model, 1e-3)], weight_decay=0.0)
    ids = torch.randint(0, 1000, (2, 8), generator=torch.Generator().manual_seed(procs.rank))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()  # AdamW's states exist from the first step on
    params = list(model.parameters())
    states = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.ndim > 0]
    result = {"params": local_bytes(params), "grads": local_bytes([p.grad for p in params]),
              "optimizer": local_bytes(states), "numels": [p.numel() for p in params],
              "shapes": [[p.shape[0], p.numel() // p.shape[0]] for p in params], "world_size": procs.world_size}
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{mode}-rank{procs.rank}.json").write_text(json.dumps(result))
    procs.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    if sys.argv[1] == "ppo-step":
        ppo_step(Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4])
    else:
        memory(Path(sys.argv[2]), sys.argv[3])
