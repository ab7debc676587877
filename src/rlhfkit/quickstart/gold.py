"""The simulated human labeler ("gold" judge) of the built-in quickstart task.

The quickstart task is "make the policy's responses more positive". Its gold judge is the VADER
sentiment compound score of a response (Hutto & Gilbert, 2014; the ``vaderSentiment`` package, a
rule-based judge with a bundled lexicon), a number in [-1, 1]. Simulated preference labels between two
responses A and B follow a Bradley–Terry model over their gold scores with a noise temperature T:

    P(A preferred over B) = σ((g_A − g_B) / T)

(Bradley & Terry, 1952; the same link the reward model's pairwise loss assumes). A small T gives almost
noiseless labels; a large T gives labels close to coin flips. The reward model is trained on these labels
and PPO then optimises the reward model (the "proxy"), while the gold judge measures what really happened
(Gao et al., 2022, "Scaling Laws for Reward Model Overoptimization").

This module also ships the built-in prompts (``prompts.jsonl``, package data): short open-ended prompts
with a fixed held-out split, chosen once as the 22% of prompts with the smallest SHA-256 digest of their
text and stored in the file.
"""

from __future__ import annotations

import json
import math
from importlib import resources
from typing import Sequence

import numpy as np

from rlhfkit.errors import RlhfkitError, data_error

PROMPTS_RESOURCE = "prompts.jsonl"
SPLITS = ("train", "heldout")


class GoldJudge:
    """VADER sentiment compound score of each text, in [-1, 1] (positive = more positive sentiment).

    The analyzer (and its lexicon) is built once, in the constructor.
    """

    def __init__(self) -> None:
        try:
            from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
        except ImportError as exc:  # the judge is an optional dependency (extra "quickstart")
            raise RlhfkitError(
                "the quickstart gold judge needs the 'vaderSentiment' package: "
                "pip install 'rlhfkit[quickstart]' (or pip install vaderSentiment)"
            ) from exc
        self._analyzer = SentimentIntensityAnalyzer()

    def score(self, texts: Sequence[str]) -> list[float]:
        """Gold scores of ``texts``: one VADER compound score per text (0.0 for an empty text)."""
        if isinstance(texts, str):
            raise TypeError("score() takes a sequence of texts, not a single string")
        return [float(self._analyzer.polarity_scores(text)["compound"]) for text in texts]


_SHARED: GoldJudge | None = None


def shared_judge() -> GoldJudge:
    """One `GoldJudge` per process (building the VADER lexicon takes a moment)."""
    global _SHARED
    if _SHARED is None:
        _SHARED = GoldJudge()
    return _SHARED


def gold_reward(prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
    """The gold judge as a rule-based reward source (``rlhfkit.quickstart.gold:gold_reward`` for
    ``--reward_model`` or ``--monitor_rewards``): the VADER compound score of each response."""
    return shared_judge().score(list(responses))


def _check_temperature(temperature: float) -> float:
    t = float(temperature)
    if not (math.isfinite(t) and t > 0.0):
        raise RlhfkitError(f"label noise temperature must be a finite number > 0, got {temperature!r}")
    return t


def _as_pair_arrays(gold_a: Sequence[float], gold_b: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(gold_a, dtype=np.float64).reshape(-1)
    b = np.asarray(gold_b, dtype=np.float64).reshape(-1)
    if a.shape != b.shape:
        raise ValueError(f"gold_a and gold_b must have the same length, got {a.size} and {b.size}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("gold scores must be finite")
    return a, b


def bradley_terry_prob(gold_a: float | Sequence[float], gold_b: float | Sequence[float],
                       temperature: float) -> float | np.ndarray:
    """Bradley–Terry probability that A is preferred over B.

    Equation: P(A ≻ B) = σ((g_A − g_B) / T) with σ(x) = 1 / (1 + e^(−x)), computed as
    ½(1 + tanh(x/2)), which is exact and never overflows.
    Shapes: scalars → float; sequences of equal length N → float64 array (N,).
    Source: Bradley & Terry (1952); Christiano et al. (2017) use the same link for human preferences.
    Raises ``RlhfkitError`` if ``temperature`` is not a finite number > 0.
    """
    t = _check_temperature(temperature)
    scalar = np.ndim(gold_a) == 0 and np.ndim(gold_b) == 0
    a, b = _as_pair_arrays(np.atleast_1d(gold_a), np.atleast_1d(gold_b))
    prob = 0.5 * (1.0 + np.tanh((a - b) / (2.0 * t)))
    return float(prob[0]) if scalar else prob


def _rng(seed: int | np.random.Generator) -> np.random.Generator:
    if isinstance(seed, np.random.Generator):
        return seed
    if isinstance(seed, (int, np.integer)) and not isinstance(seed, bool):
        return np.random.default_rng(int(seed))
    raise TypeError(f"seed must be an int or a numpy Generator, got {type(seed).__name__}")


def label_pairs(gold_a: Sequence[float], gold_b: Sequence[float], temperature: float,
                seed: int | np.random.Generator) -> list[bool]:
    """Sample simulated preference labels: True where A is preferred over B.

    Label i is True with probability ``bradley_terry_prob(gold_a[i], gold_b[i], temperature)``:
    ``u_i < p_i`` with u_i ~ Uniform[0, 1) drawn from a numpy Generator (``seed`` is an int or a
    Generator, which is advanced). The same seed and inputs give the same labels.
    """
    prob = np.atleast_1d(bradley_terry_prob(np.asarray(gold_a, dtype=np.float64),
                                            np.asarray(gold_b, dtype=np.float64), temperature))
    u = _rng(seed).random(prob.shape[0])
    return [bool(x) for x in (u < prob)]


def noiseless_agreement(gold_a: Sequence[float], gold_b: Sequence[float], labels: Sequence[bool]) -> float:
    """Fraction of labels that agree with the noiseless order (A preferred iff g_A > g_B).

    Ties: pairs with g_A == g_B exactly (common, since VADER gives 0.0 to every neutral text and rounds to
    4 decimals) have no noiseless order and are excluded from both numerator and denominator.
    Returns NaN when every pair is tied (or there are no pairs).
    """
    a, b = _as_pair_arrays(gold_a, gold_b)
    lab = np.asarray(labels, dtype=bool).reshape(-1)
    if lab.shape != a.shape:
        raise ValueError(f"labels must have one entry per pair, got {lab.size} for {a.size} pairs")
    untied = a != b
    if not untied.any():
        return float("nan")
    return float(np.mean(lab[untied] == (a[untied] > b[untied])))


def expected_agreement(gold_a: Sequence[float], gold_b: Sequence[float], temperature: float) -> float:
    """Expected value of ``noiseless_agreement`` under the Bradley–Terry labeler (ties excluded the same way).

    For an untied pair the label agrees with the noiseless order with probability σ(|g_A − g_B| / T);
    this returns the mean of that over untied pairs (NaN when every pair is tied).
    """
    a, b = _as_pair_arrays(gold_a, gold_b)
    untied = a != b
    if not untied.any():
        return float("nan")
    diff = np.abs(a[untied] - b[untied])
    return float(np.mean(bradley_terry_prob(diff, np.zeros_like(diff), temperature)))


def load_builtin_prompts() -> tuple[list[str], list[str]]:
    """The built-in quickstart prompts as ``(train, heldout)`` lists, in file order.

    Read from the package data file ``rlhfkit/quickstart/prompts.jsonl`` (one
    ``{"prompt": str, "split": "train" | "heldout"}`` per line); the split is fixed in the file.
    """
    resource = resources.files("rlhfkit.quickstart").joinpath(PROMPTS_RESOURCE)
    name = f"rlhfkit/quickstart/{PROMPTS_RESOURCE}"
    try:
        text = resource.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise RlhfkitError(f"{name} is missing from the installed package; reinstall rlhfkit") from exc
    splits: dict[str, list[str]] = {s: [] for s in SPLITS}
    for row, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise data_error(name, row, None, f"malformed JSON ({exc.msg})") from exc
        prompt, split = obj.get("prompt"), obj.get("split")
        if not isinstance(prompt, str) or not prompt.strip():
            raise data_error(name, row, "prompt", "missing or empty text")
        if split not in splits:
            raise data_error(name, row, "split", f"must be one of {SPLITS}, got {split!r}")
        splits[split].append(prompt)
    return splits["train"], splits["heldout"]
