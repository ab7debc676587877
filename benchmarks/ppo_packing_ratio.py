"""Packed vs padded PPO micro-batches, in ONE process: the time ratio of steps 3-5 of an iteration.

For measuring under contention (a shared machine), where two processes timed apart cannot be compared: one
`PPOTrainer` on the realistic workload of ``bench_ppo.py`` (the real SmolLM2-135M-Instruct, the quickstart's
prompts with the chat template, responses that stop at EOS, the quickstart's PPO settings: 32 prompts, 2 epochs ×
2 minibatches × micro-batches of 8, policy blocks 0-15 and critic blocks 0-25 frozen), float32, ``torch`` threads
``--threads``. It samples ONE rollout, then runs the no-grad forwards + advantages (`PPOTrainer.prepare`) and the
update (`PPOTrainer.update`) on it with ``packing`` on and off, interleaved as on, off, off, on, each from the same
weights and optimizer state (restored between runs), and reports the time of each and their ratio. Only the ratios
mean something on a busy machine. ``--prefix`` compares instead packed micro-batches with and without the shared
prefix (the chat template's leading tokens that every row has in common, run once per micro-batch:
`rlhfkit.models.packing.varlen_layout`), both packed.

    python benchmarks/ppo_packing_ratio.py              # prints one JSON line
    python benchmarks/ppo_packing_ratio.py --tiny       # the anchor's tiny random model, 8 new tokens (smoke run)
    python benchmarks/ppo_packing_ratio.py --prefix     # packed: the rows' common prefix once vs in every row
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
from bench_ppo import QUICKSTART_PPO, QUICKSTART_PPO_TINY  # noqa: E402


def score(prompts: list[str], responses: list[str]) -> list[float]:
    """A stand-in reward (response length in words / 10): the timing does not depend on its values."""
    return [len(r.split()) / 10.0 for r in responses]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tiny", action="store_true", help="the anchor's tiny random model, 4 prompts, 8 new tokens")
    p.add_argument("--prefix", action="store_true",
                   help="packed with the rows' common prefix shared (on) vs not shared (off) instead of packed vs "
                        "padded")
    p.add_argument("--config-dir", default=C.DEFAULT_CONFIG_DIR)
    a = p.parse_args(argv)
    import torch

    from rlhfkit.models import packing as packing_module
    from rlhfkit.models.loading import hf_folder, smollm2_gguf_path
    from rlhfkit.quickstart.gold import load_builtin_prompts
    from rlhfkit.train.ppo_config import PPOConfig
    from rlhfkit.train.ppo_trainer import PPOTrainer
    from rlhfkit.quickstart.pipeline import write_jsonl

    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        policy = C.save_random_causal_lm(a.config_dir, work / "policy", True) if a.tiny else \
            hf_folder(smollm2_gguf_path())
        prompts = work / "prompts.jsonl"
        write_jsonl(prompts, [{"prompt": [{"role": "user", "content": q}]} for q in load_builtin_prompts()[0]])
        settings = QUICKSTART_PPO_TINY if a.tiny else QUICKSTART_PPO
        if a.tiny:
            settings = {**settings, "freeze_layers": 1, "critic_freeze_layers": 1}
        cfg = PPOConfig(policy=str(policy), reward_model=["ppo_packing_ratio:score"], prompts=str(prompts),
                        output=str(work / "run"), critic_init="policy", temperature=1.0, seed=0,
                        max_new_tokens=8 if a.tiny else 32, rollout_batch_size=4 if a.tiny else 32, packing="on",
                        **settings)
        trainer = PPOTrainer(cfg)
        default_saving = packing_module.MIN_PREFIX_SAVING
        rollout, _ = trainer.rollout()
        raw = torch.linspace(-1, 1, rollout.query_ids.shape[0])
        models = [trainer.policy, trainer.critic]
        optimizers = [o for o in (trainer.policy_optimizer, trainer.critic_optimizer) if o is not None]
        start_state = copy.deepcopy(([m.state_dict() for m in models], [o.state_dict() for o in optimizers]))

        def run(packing: bool) -> float:
            for m, s in zip(models, start_state[0]):
                m.load_state_dict(s)
            for o, s in zip(optimizers, start_state[1]):
                o.load_state_dict(copy.deepcopy(s))
            if a.prefix:  # packed both times; the prefix shared or not (an unreachable saving turns it off)
                packing_module.MIN_PREFIX_SAVING = default_saving if packing else 10 ** 9
            else:
                trainer.update_settings.packing = packing
            t0 = time.perf_counter()
            trainer.update(trainer.prepare(rollout, raw))
            return time.perf_counter() - t0

        times = {True: 0.0, False: 0.0}
        try:
            run(True)  # warm-up of both paths
            run(False)
            for packing in (True, False, False, True):
                times[packing] += run(packing) / 2
        finally:
            packing_module.MIN_PREFIX_SAVING = default_saving
    q, r = rollout.query_mask.bool(), rollout.response_mask.bool()
    out = {"model": "tiny random" if a.tiny else "SmolLM2-135M-Instruct", "rows": int(q.shape[0]),
           "real_tokens": int(q.sum() + r.sum()), "padded_tokens": int(q.numel() + r.numel()),
           "response_tokens": int(r.sum()), "response_slots": int(r.numel()),
           **({"prefix_shared_s": round(times[True], 2), "prefix_unshared_s": round(times[False], 2)} if a.prefix else
              {"packed_s": round(times[True], 2), "padded_s": round(times[False], 2)}),
           "speedup": round(times[False] / times[True], 3), "threads": a.threads, "loadavg": C.loadavg()}
    print(json.dumps(out), flush=True)
    return out


if __name__ == "__main__":
    main()
