"""Shared helpers of the reward-model tests: a tiny Llama "SFT model" folder with a word-level tokenizer, and
preference / pointwise data files whose preference rule is learnable (tests/train is on sys.path under pytest)."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer
from tolerances import EPS32, forward_factor, gradient_factor, gradient_terms, propagated_tolerance, sum_tolerance
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

PAD, EOS, UNK = 0, 1, 2
WORDS = [f"w{i}" for i in range(3, 46)]
GOOD, BAD = "good", "bad"  # the learnable rule: chosen responses contain GOOD, rejected ones BAD
MARKERS = ["<prompt>", "<response", "A>", "B>", "<verdict>"]  # the words of the PairRM input format
VOCAB = 3 + len(WORDS) + 2 + len(MARKERS)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread; several threads on a shared, busy CPU slow them down many times."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_tokenizer() -> PreTrainedTokenizerFast:
    words = WORDS + [GOOD, BAD] + MARKERS
    vocab = {"<pad>": PAD, "<eos>": EOS, "<unk>": UNK, **{w: i for i, w in enumerate(words, start=3)}}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def make_sft_folder(path: Path, seed: int = 0, hidden: int = 32) -> Path:
    """A tiny random Llama (float32) + tokenizer saved as an HF folder: the 'SFT model' of the tests."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         pad_token_id=PAD, eos_token_id=EOS, bos_token_id=None, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


def _words(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def _with(rng: random.Random, text: str, word: str) -> str:
    parts = text.split()
    parts.insert(rng.randint(0, len(parts)), word)
    return " ".join(parts)


def preference_rows(n: int, seed: int = 0, margin: bool = False) -> list[dict]:
    """Pairs whose chosen response holds the word GOOD and whose rejected response holds BAD (else random)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        row = {"prompt": _words(rng, 2, 6), "chosen": _with(rng, _words(rng, 1, 5), GOOD),
               "rejected": _with(rng, _words(rng, 1, 5), BAD)}
        if margin:
            row["margin"] = float(rng.choice([0.0, 0.5, 1.0]))
        rows.append(row)
    return rows


def pointwise_rows(n: int, kind: str, seed: int = 0) -> list[dict]:
    """Rows whose response holds GOOD (label 1 / score 1 / aspects (1, 0)) or BAD (label 0 / score -1 / (0, 1))."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        good = i % 2 == 0
        row = {"prompt": _words(rng, 2, 6), "response": _with(rng, _words(rng, 1, 5), GOOD if good else BAD)}
        if kind == "label":
            row["label"] = int(good)
        elif kind == "score":
            row["score"] = 1.0 if good else -1.0
        else:
            row["helpful"], row["harmful"] = (1.0, 0.0) if good else (0.0, 1.0)
            if i % 3 == 0:
                row["harmful"] = None  # a missing aspect is masked out
        rows.append(row)
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the model's safetensors file(s) in an HF folder."""
    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update({f"{f.name}:{k}": v for k, v in load_file(str(f)).items()})
    return out


# ----------------------------------------------------------------------------------------------------------
# Float32 rounding bounds of the reward-model trainer's quantities (see tests/tolerances.py)
# ----------------------------------------------------------------------------------------------------------
def accumulate(model, objective, items, split: list[int]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The gradients and totals of ``backward_global_batch`` over ``items`` cut into micro-batches of ``split``."""
    from accelerate import Accelerator

    from rlhfkit.train import reward_trainer

    model.zero_grad(set_to_none=True)
    starts = [sum(split[:k]) for k in range(len(split))]
    parts = [items[a: a + n] for a, n in zip(starts, split)]
    sums = reward_trainer.backward_global_batch(model, objective, parts, objective.weight(items),
                                                Accelerator(cpu=True), bf16=False)
    names = objective.names  # the named sums as the vector [loss·w, w, count, *sums, tokens] of the bounds below
    totals = torch.tensor([sums.total("loss"), sums.weight("loss"), sums.weight(names[0]),
                           *[sums.total(n) for n in names], sums.total("tokens")], dtype=torch.float64)
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, totals


def totals_tolerances(model, objective, items) -> torch.Tensor:
    """How far two evaluations of ``backward_global_batch``'s totals ``[loss·w, w, count, *sums, tokens]`` over
    ``items`` may differ by float32 rounding: 0 for the counts and the accuracy (exact; integers in float64), and
    for the float totals the rounding of the head outputs z (one forward of the whole batch) propagated into them,
    plus for the loss its formula and the float32 mean of its non-negative per-example terms."""
    from rlhfkit.models.pairrm import PairRanker
    from rlhfkit.train import reward_trainer
    from rlhfkit.train.rm_eval import forward_pairs

    batch = objective.collate(items)
    outputs: list[torch.Tensor] = []
    head = (model.rm if isinstance(model, PairRanker) else model)._head()
    handle = head.register_forward_hook(lambda module, args, out: outputs.append(out))
    loss = objective.step(model, batch).loss * objective.weight(items)
    if isinstance(objective, reward_trainer.PairwiseObjective):
        diff, chosen, rejected, _ = forward_pairs(model, batch, objective.share_prompts)
        sums = {"margin": diff.sum()} | ({} if chosen is None else {"chosen_mean": chosen.sum(),
                                                                    "rejected_mean": rejected.sum()})
    else:
        sums = {"score_mean": model(batch["input_ids"], batch["attention_mask"], batch["response_mask"]).scores.sum()}
    handle.remove()
    z_loss, z_sums = outputs
    stages = forward_factor(2)  # the head outputs of the 2 decoder layers' tiny Llama, in two evaluations
    # the loss formula (exp, log: 2 stages) and a float32 mean over the rows (log2 levels), in two evaluations
    mean = 2 * (2 + math.log2(batch["input_ids"].shape[0]))
    tol = [propagated_tolerance(loss, z_loss, stages) + sum_tolerance(loss, mean), 0.0, 0.0]
    tol += [propagated_tolerance(sums[n], z_sums, stages) if n in sums else 0.0 for n in objective.names]
    return torch.tensor(tol + [0.0], dtype=torch.float64)


def first_step_tolerances(flags: list[str]) -> dict[str, float]:
    """Per metric of the first row of ``rlhfkit rm train <flags>`` (with ``--logging_steps 1``): how far two runs
    that differ only in rounding (micro-batching, processes) may differ. That step's metrics come from the initial
    model, before the optimizer amplifies rounding (Adam's first steps move a weight by ±lr whatever the size of its
    gradient). Rebuilds the run's first global batch (its seeded batch plan) and initial model."""
    return first_step(flags)[0]


def first_step(flags: list[str]) -> tuple[dict[str, float], dict[str, torch.Tensor], dict[str, float]]:
    """``(first_step_tolerances, gradients, gradient_terms)`` of the run's first global batch on its initial model
    (gradients by parameter name of the reward model)."""
    from rlhfkit.config import parse_config
    from rlhfkit.data.tokenize import LengthGroupedBatchSampler
    from rlhfkit.models.loading import load_tokenizer
    from rlhfkit.train import reward_trainer
    from rlhfkit.train.rm_config import RMTrainConfig
    from rlhfkit.train.rm_eval import pad_id_of

    cfg = parse_config(RMTrainConfig, flags)
    assert cfg.logging_steps == 1 and not cfg.group_by_prompt  # the first row is the first step; its batch plan
    tokenizer = load_tokenizer(cfg.model)
    items, _ = reward_trainer.tokenize_examples(cfg, tokenizer, reward_trainer.load_examples(cfg)[0], cfg.data)
    sampler = LengthGroupedBatchSampler([reward_trainer.pair_length(it) for it in items], cfg.batch_size,
                                        cfg.seed, drop_last=True, group_size_multiplier=50 if cfg.group_by_length else 1)
    batch = [items[i] for i in sampler.batches(0)[0]]
    model = reward_trainer.build_model(cfg, reward_trainer.resolve_kind(cfg), tokenizer).train()
    objective = (reward_trainer.PairwiseObjective if cfg.pairwise else reward_trainer.PointwiseObjective)(
        cfg, pad_id_of(model))
    runs = []
    terms = gradient_terms(model, lambda: runs.append(accumulate(model, objective, batch, [len(batch)])))
    (grads, totals), = runs
    tol = totals_tolerances(model, objective, batch)
    weight, count = float(totals[1]), float(totals[2])
    out = {"rm/loss": float(tol[0]) / weight}  # the logged means: loss·w / w and sums / count
    out.update({f"rm/{n}": float(tol[3 + k]) / count for k, n in enumerate(objective.names)})
    # the gradient's norm moves by (g / ‖g‖)·Δg (first order) under the per-tensor bounds of the 2 decoder layers'
    # gradients, plus the float32 norm's own rounding (log2 N levels and the square root, two evaluations)
    n = sum(g.numel() for g in grads.values())
    norm = math.sqrt(sum(float(g.double().square().sum()) for g in grads.values()))
    moved = sum(gradient_factor(2) * EPS32 * terms[k] * float(g.double().abs().sum()) for k, g in grads.items())
    out["train/grad_norm"] = moved / norm + sum_tolerance(norm, 2 * (math.log2(n) + 1))
    out.update({"train/lr": 0.0, "train/epoch": 0.0, "step": 0.0})  # the same numbers in both runs
    return out, grads, terms
