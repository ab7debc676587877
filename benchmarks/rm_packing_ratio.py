"""Packed vs padded reward-model micro-batches, in ONE process: the time ratio of a forward + backward pass.

For measuring under contention (a shared machine), where two processes timed apart cannot be compared: both
paths run in the same process on the same micro-batches, interleaved per micro-batch as packed, padded, padded,
packed (after one warm-up of each), so that a slow drift of the machine's load hits both alike. Workload: the
first ``--pairs`` of ``bench_rm.py``'s 64 pairs (``_common.anchor_pairs``), an rlhfkit ``RewardModel`` on the
SmolLM2-135M architecture (random init), float32, ``torch`` threads ``--threads``; micro-batches of 1 and of 2
pairs; the loss is the trainer's pairwise log-sigmoid through ``train.rm_eval.forward_pairs`` (the trainer's
forward) with ``packing`` on and off. Only the ratios mean something on a busy machine.

    python benchmarks/rm_packing_ratio.py              # prints one JSON line per micro-batch size
    python benchmarks/rm_packing_ratio.py --tiny --pairs 8
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", type=int, default=4, help="the first N of the benchmark's pairs (even)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tiny", action="store_true", help="the anchor's tiny shape")
    p.add_argument("--config-dir", default=C.DEFAULT_CONFIG_DIR)
    a = p.parse_args(argv)
    import torch

    from rlhfkit.core.losses import pairwise_logsigmoid
    from rlhfkit.data.tokenize import TokenizedPair, collate_pairs
    from rlhfkit.models.reward import RewardModel
    from rlhfkit.train.rm_eval import forward_pairs

    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as work:
        rm = RewardModel.from_backbone(C.save_random_causal_lm(a.config_dir, Path(work) / "model", a.tiny)).train()
    chosen, rejected = C.anchor_pairs(rm.config.vocab_size, 64)
    items = [TokenizedPair(c, r, 0, 0, None, i + 1) for i, (c, r) in enumerate(zip(chosen, rejected))][:a.pairs]

    def step(batch: dict, packing: bool) -> float:
        rm.zero_grad(set_to_none=True)
        start = time.perf_counter()
        _, c, r, _ = forward_pairs(rm, batch, True, packing)
        pairwise_logsigmoid(c, r).backward()
        return time.perf_counter() - start

    micro = {m: [collate_pairs(items[i:i + m], rm.pad_token_id) for i in range(0, len(items), m)] for m in (1, 2)}
    step(micro[1][0], True)
    step(micro[1][0], False)
    times = {(m, packing): 0.0 for m in micro for packing in (True, False)}
    for k in range(len(micro[2])):  # micro-batch k of 2 pairs, then its 2 pairs alone
        for m, batches in ((2, micro[2][k:k + 1]), (1, micro[1][2 * k:2 * k + 2])):
            for batch in batches:
                for packing in (True, False, False, True):
                    times[(m, packing)] += step(batch, packing) / 2
    out = {}
    for m, batches in micro.items():
        out[m] = {"real_tokens": sum(int(b["attention_mask"].sum()) for b in batches),
                  "padded_tokens": sum(b["attention_mask"].numel() for b in batches),
                  "packed_s": round(times[(m, True)], 2), "padded_s": round(times[(m, False)], 2),
                  "speedup": round(times[(m, False)] / times[(m, True)], 3)}
        print(json.dumps({"micro_batch_pairs": m, **out[m]}), flush=True)
    return out


if __name__ == "__main__":
    main()
