"""Plots and a markdown summary regenerated from a quickstart run folder (``rlhfkit report DIR``).

Run-folder layout (written by the quickstart pipeline; this module reads it and writes ``plots/`` and
``summary.md``; files marked * are required by :func:`regenerate`):

    run/
      config.yaml              the resolved configuration (optional here; shown in summary.md if present)
      metrics/ppo.jsonl      * one JSON object per PPO iteration, at least
                                 iteration          int, 0- or 1-based, increasing
                                 objective/kl       mean KL(policy || reference) of the rollouts, nats/sequence
                                 objective/scores   mean proxy (reward-model) score of the rollouts
                                 gold/mean          mean gold score of the same rollouts
                                 objective/kl_coef  the KL coefficient used in that iteration
                               (a repeated iteration, e.g. after a resume, keeps its last row)
      rm_eval.json           * reward model on held-out preference pairs:
                                 the JSON of `rlhfkit rm eval` (rlhfkit.train.rm_eval): accuracy, ece, bins:
                                 [{lo, hi, n, accuracy, confidence}, ...] (confidence = σ(|score_A − score_B|);
                                 accuracy/confidence are null for an empty bin)
      eval/before.jsonl      * per held-out prompt, the SFT policy: prompt, response, gold, proxy
      eval/after.jsonl       * per held-out prompt, the trained policy: prompt, response, gold, proxy, kl
                                 (optional in both: response_tokens, the response length in tokens)
      summary.json           * headline numbers, see SUMMARY_KEYS (the required ones are REQUIRED_SUMMARY_KEYS;
                                 keys starting with "time_" are seconds; other extra keys are shown as is)
      tensorboard/             TensorBoard event files (not read here)
      models/reward_model/     the reward model (Hugging Face layout; not read here)
      models/policy/           the trained policy (Hugging Face layout; not read here)

Outputs: ``plots/reward_vs_iteration.png``, ``plots/overoptimization.png``, ``plots/rm_calibration.png``,
``plots/gold_distribution.png`` and ``summary.md``. All inputs are read and validated before anything is
written, so an incomplete run folder raises ``RlhfkitError`` naming the missing file and writes nothing.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from rlhfkit.errors import RlhfkitError, data_error

PPO_METRICS = "metrics/ppo.jsonl"
RM_EVAL = "rm_eval.json"
EVAL_BEFORE = "eval/before.jsonl"
EVAL_AFTER = "eval/after.jsonl"
SUMMARY_JSON = "summary.json"
CONFIG = "config.yaml"
REQUIRED_FILES = (PPO_METRICS, RM_EVAL, EVAL_BEFORE, EVAL_AFTER, SUMMARY_JSON)
PPO_KEYS = ("iteration", "objective/kl", "objective/scores", "gold/mean", "objective/kl_coef")
RM_EVAL_KEYS = ("accuracy", "ece", "bins")
BIN_KEYS = ("lo", "hi", "n", "accuracy", "confidence")  # as written by rlhfkit.train.rm_eval
EVAL_KEYS = ("prompt", "response", "gold", "proxy")

# summary.json key -> label in summary.md, in display order.
SUMMARY_KEYS = {
    "rm_accuracy": "Reward-model accuracy (held-out pairs)",
    "rm_ece": "Reward-model expected calibration error",
    "label_agreement": "Label agreement with the noiseless gold order",
    "label_temperature": "Label noise temperature T",
    "gold_before_mean": "Gold score, SFT policy (mean)",
    "gold_after_mean": "Gold score, trained policy (mean)",
    "proxy_before_mean": "Proxy (RM) score, SFT policy (mean)",
    "proxy_after_mean": "Proxy (RM) score, trained policy (mean)",
    "win_rate": "Win rate of trained over SFT (gold, ties = ½)",
    "mean_kl": "Mean KL(trained ‖ SFT) per response (nats)",
    "response_tokens_before_mean": "Response length, SFT policy (tokens)",
    "response_tokens_after_mean": "Response length, trained policy (tokens)",
}
REQUIRED_SUMMARY_KEYS = ("rm_accuracy", "gold_before_mean", "gold_after_mean", "win_rate", "mean_kl")
PLOT_NAMES = ("reward_vs_iteration.png", "overoptimization.png", "rm_calibration.png", "gold_distribution.png")
NUM_SAMPLES = 5


# ----------------------------------------------------------------------------------------------- reading

def _require(run_dir: Path, rel: str) -> Path:
    path = run_dir / rel
    if not path.is_file():
        raise RlhfkitError(f"incomplete run folder {run_dir}: missing {rel} ({path})")
    return path


def _read_json(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise data_error(path, None, None, f"malformed JSON ({exc.msg}, line {exc.lineno})") from exc
    if not isinstance(obj, dict):
        raise data_error(path, None, None, "expected a JSON object")
    return obj


def _read_jsonl(path: Path, keys: tuple[str, ...]) -> list[dict]:
    rows = []
    for row, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise data_error(path, row, None, f"malformed JSON ({exc.msg})") from exc
        if not isinstance(obj, dict):
            raise data_error(path, row, None, "expected a JSON object")
        for key in keys:
            if key not in obj:
                raise data_error(path, row, key, "missing")
        rows.append(obj)
    if not rows:
        raise data_error(path, None, None, "no rows")
    return rows


def _number(value: Any, path: Path, row: int | None, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise data_error(path, row, field, f"expected a number, got {value!r}")
    if not math.isfinite(value):  # the run writes non-finite values as null: NaN or inf here is a corrupt file
        raise data_error(path, row, field, f"must be a finite number, got {value}")
    return float(value)


def load_run(run_dir: str | Path) -> dict[str, Any]:
    """Read and validate every input of the report; raises ``RlhfkitError`` naming a missing/bad file."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise RlhfkitError(f"run folder {run_dir} does not exist")
    if not run_dir.is_dir():
        raise RlhfkitError(f"{run_dir} is not a folder; give the run folder of `rlhfkit quickstart` (--output)")
    paths = {rel: _require(run_dir, rel) for rel in REQUIRED_FILES}

    ppo_path = paths[PPO_METRICS]
    by_iteration: dict[float, dict[str, float]] = {}
    for i, obj in enumerate(_read_jsonl(ppo_path, PPO_KEYS), start=1):
        by_iteration[_number(obj["iteration"], ppo_path, i, "iteration")] = {
            k: _number(obj[k], ppo_path, i, k) for k in PPO_KEYS}
    ppo = [by_iteration[k] for k in sorted(by_iteration)]

    rm_path = paths[RM_EVAL]
    rm_eval = _read_json(rm_path)
    for key in RM_EVAL_KEYS:
        if key not in rm_eval:
            raise data_error(rm_path, None, key, "missing")
    for key in ("accuracy", "ece"):
        _number(rm_eval[key], rm_path, None, key)
    if not isinstance(rm_eval["bins"], list):
        raise data_error(rm_path, None, "bins", "expected a list")
    bins = []
    for b in rm_eval["bins"]:
        if not isinstance(b, dict) or any(k not in b for k in BIN_KEYS):
            raise data_error(rm_path, None, "bins", f"every bin needs the keys {BIN_KEYS}, got {b!r}")
        if b["n"] == 0:  # an empty bin has no accuracy or confidence
            continue
        bins.append({k: _number(b[k], rm_path, None, f"bins.{k}") for k in BIN_KEYS})

    evals = {}
    for rel in (EVAL_BEFORE, EVAL_AFTER):
        rows = _read_jsonl(paths[rel], EVAL_KEYS + (("kl",) if rel == EVAL_AFTER else ()))
        for i, r in enumerate(rows, start=1):
            for k in ("gold", "proxy") + (("kl",) if rel == EVAL_AFTER else ()):
                _number(r[k], paths[rel], i, k)
        evals[rel] = rows

    summary = _read_json(paths[SUMMARY_JSON])
    for key in REQUIRED_SUMMARY_KEYS:
        if key not in summary:
            raise data_error(paths[SUMMARY_JSON], None, key, "missing")
    config_path = run_dir / CONFIG
    config = config_path.read_text(encoding="utf-8") if config_path.is_file() else None
    return {"run_dir": run_dir, "ppo": ppo, "rm_eval": rm_eval, "bins": bins, "before": evals[EVAL_BEFORE],
            "after": evals[EVAL_AFTER], "summary": summary, "config": config}


def eval_headline(before: list[dict], after: list[dict]) -> dict[str, float]:
    """Headline numbers of the held-out evaluation, for the pipeline's ``summary.json``.

    Rows are paired by prompt (both files must hold the same prompts). ``win_rate`` = mean over prompts of
    1 if gold_after > gold_before, ½ if equal, 0 otherwise. Means are plain means over prompts.
    """
    before_by = {r["prompt"]: r for r in before}
    after_by = {r["prompt"]: r for r in after}
    if len(before_by) != len(before) or len(after_by) != len(after):
        raise RlhfkitError("evaluation files must hold each held-out prompt once")
    if before_by.keys() != after_by.keys():
        raise RlhfkitError("before/after evaluation files hold different prompts")
    gb = np.array([before_by[p]["gold"] for p in before_by], dtype=np.float64)
    ga = np.array([after_by[p]["gold"] for p in before_by], dtype=np.float64)
    out = {
        "gold_before_mean": float(gb.mean()),
        "gold_after_mean": float(ga.mean()),
        "proxy_before_mean": float(np.mean([r["proxy"] for r in before])),
        "proxy_after_mean": float(np.mean([r["proxy"] for r in after])),
        "win_rate": float(np.mean(np.where(ga > gb, 1.0, np.where(ga == gb, 0.5, 0.0)))),
        "mean_kl": float(np.mean([r["kl"] for r in after])),
    }
    for name, rows in (("before", before), ("after", after)):
        if all("response_tokens" in r for r in rows):
            out[f"response_tokens_{name}_mean"] = float(np.mean([r["response_tokens"] for r in rows]))
    return out


# ----------------------------------------------------------------------------------------------- plots

def _save(fig: Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    return path


def _plot_iterations(ppo: list[dict], path: Path) -> Path:
    it = [r["iteration"] for r in ppo]
    fig = Figure(figsize=(7, 7.5))
    axes = fig.subplots(3, 1, sharex=True)
    axes[0].plot(it, [r["objective/scores"] for r in ppo], marker="o", ms=3, color="tab:blue")
    axes[0].set_ylabel("proxy (RM) score")
    axes[0].set_title("Rewards during PPO (rollout means)")
    axes[1].plot(it, [r["gold/mean"] for r in ppo], marker="o", ms=3, color="tab:green")
    axes[1].set_ylabel("gold score")
    axes[2].plot(it, [r["objective/kl"] for r in ppo], marker="o", ms=3, color="tab:red", label="KL")
    axes[2].set_ylabel("KL (nats)")
    coef_ax = axes[2].twinx()
    coef_ax.plot(it, [r["objective/kl_coef"] for r in ppo], ls="--", color="tab:gray", label="kl_coef")
    coef_ax.set_ylabel("kl_coef")
    handles = axes[2].get_legend_handles_labels()[0] + coef_ax.get_legend_handles_labels()[0]
    axes[2].legend(handles, [h.get_label() for h in handles], loc="best", fontsize=8)
    axes[2].set_xlabel("PPO iteration")
    for ax in axes:
        ax.grid(alpha=0.3)
    return _save(fig, path)


def _plot_overoptimization(ppo: list[dict], path: Path) -> Path:
    """Proxy and gold score against KL, x-axis on a square-root scale as in Gao et al. (2022), Fig. 1."""
    kl = np.array([r["objective/kl"] for r in ppo])
    order = np.argsort(kl, kind="stable")
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    ax.plot(kl[order], np.array([r["objective/scores"] for r in ppo])[order], marker="o", ms=3,
            color="tab:blue", label="proxy (RM)")
    ax.set_xscale("function", functions=(lambda x: np.sqrt(np.clip(x, 0, None)), lambda y: np.square(y)))
    ax.set_xlabel("KL(policy ‖ reference), nats (√ scale)")
    ax.set_ylabel("proxy (RM) score", color="tab:blue")
    gold_ax = ax.twinx()
    gold_ax.plot(kl[order], np.array([r["gold/mean"] for r in ppo])[order], marker="s", ms=3,
                 color="tab:green", label="gold")
    gold_ax.set_ylabel("gold score", color="tab:green")
    ax.set_title("Over-optimisation: proxy vs gold as the policy moves away")
    handles = ax.get_legend_handles_labels()[0] + gold_ax.get_legend_handles_labels()[0]
    ax.legend(handles, [h.get_label() for h in handles], loc="best")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def _plot_calibration(rm_eval: dict, bins: list[dict], path: Path) -> Path:
    fig = Figure(figsize=(5.5, 5.5))
    ax = fig.subplots()
    lo = min([0.5] + [b["lo"] for b in bins])
    ax.plot([lo, 1.0], [lo, 1.0], ls="--", color="tab:gray", label="perfect calibration")
    used = [b for b in bins if b["n"] > 0]
    for b in used:
        width = b["hi"] - b["lo"]
        ax.bar(b["lo"], b["accuracy"], width=width, align="edge", color="tab:blue", alpha=0.6,
               edgecolor="black")
        ax.annotate(f"n={int(b['n'])}", ((b["lo"] + b["hi"]) / 2, b["accuracy"]),
                    ha="center", va="bottom", fontsize=7)
    ax.plot([b["confidence"] for b in used], [b["accuracy"] for b in used], "o", color="tab:orange",
            label="bin (mean confidence, accuracy)")
    ax.set_xlim(lo, 1.0)
    ax.set_ylim(0.0, 1.05)
    ax.set_xlabel("confidence σ(|score_A − score_B|)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"Reward-model calibration: accuracy {rm_eval['accuracy']:.3f}, ECE {rm_eval['ece']:.3f}")
    ax.legend(loc="upper left", fontsize=8)
    return _save(fig, path)


def _plot_distribution(before: list[dict], after: list[dict], path: Path) -> Path:
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    edges = np.linspace(-1.0, 1.0, 21)
    for rows, label, color in ((before, "SFT policy (before)", "tab:gray"), (after, "trained (after)", "tab:green")):
        gold = np.array([r["gold"] for r in rows], dtype=np.float64)
        ax.hist(np.clip(gold, -1, 1), bins=edges, alpha=0.5, color=color, edgecolor="black",
                label=f"{label}: mean {gold.mean():.3f}")
        ax.axvline(gold.mean(), color=color, ls="--")
    ax.set_xlabel("gold score (VADER compound)")
    ax.set_ylabel("held-out prompts")
    ax.set_title("Gold scores of held-out responses")
    ax.legend(loc="upper left")
    return _save(fig, path)


def _make_plots(run: dict[str, Any]) -> list[Path]:
    out = run["run_dir"] / "plots"
    out.mkdir(parents=True, exist_ok=True)
    return [
        _plot_iterations(run["ppo"], out / PLOT_NAMES[0]),
        _plot_overoptimization(run["ppo"], out / PLOT_NAMES[1]),
        _plot_calibration(run["rm_eval"], run["bins"], out / PLOT_NAMES[2]),
        _plot_distribution(run["before"], run["after"], out / PLOT_NAMES[3]),
    ]


def make_plots(run_dir: str | Path) -> list[Path]:
    """Write the four PNG plots into ``run_dir/plots/`` and return their paths."""
    return _make_plots(load_run(run_dir))


# ----------------------------------------------------------------------------------------------- summary

def md_escape(text: str, max_chars: int = 400) -> str:
    """Make ``text`` safe inside a markdown table cell: HTML-escape ``& < >``, backslash-escape the
    characters that act inline in a cell (``\\ ` * _ [ ] | ~ # $``; ``$`` starts math on GitHub), turn
    newlines into ``<br>`` and shorten to ``max_chars`` characters."""
    text = str(text)
    if len(text) > max_chars:
        text = text[: max_chars - 1] + "…"
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    text = "".join("\\" + c if c in "\\`*_[]|~#$" else c for c in text)
    return "<br>".join(line.strip() for line in text.replace("\r\n", "\n").split("\n"))


def _fmt(key: str, value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return md_escape(json.dumps(value) if not isinstance(value, str) else value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if key.startswith("time_"):
        return f"{value:.1f} s"
    if key.startswith("response_tokens"):
        return f"{value:.1f}"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _samples(before: list[dict], after: list[dict], n: int) -> list[tuple[dict, dict]]:
    after_by = {r["prompt"]: r for r in after}
    return [(b, after_by[b["prompt"]]) for b in before if b["prompt"] in after_by][:n]


def _summary_markdown(run: dict[str, Any]) -> str:
    summary = run["summary"]
    lines = ["# rlhfkit quickstart report", "", f"Run folder: `{run['run_dir'].name}`", "",
             "## Headline numbers", "", "| metric | value |", "|---|---|"]
    for key, label in SUMMARY_KEYS.items():
        if key in summary:
            lines.append(f"| {label} | {_fmt(key, summary[key])} |")
    for key in sorted(k for k in summary if k not in SUMMARY_KEYS):
        label = key
        if key.startswith("time_"):  # time_ppo_s -> "time: ppo"
            label = "time: " + key[len("time_"):].removesuffix("_s").replace("_", " ")
        lines.append(f"| {md_escape(label)} | {_fmt(key, summary[key])} |")
    lines += ["", f"PPO iterations logged: {len(run['ppo'])}; held-out prompts: {len(run['before'])}.", "",
              "## Plots", ""]
    titles = ("Proxy and gold reward vs iteration", "Over-optimisation: proxy and gold vs KL",
              "Reward-model calibration", "Gold score distribution before/after")
    for name, title in zip(PLOT_NAMES, titles):
        lines += [f"### {title}", "", f"![{title}](plots/{name})", ""]
    lines += ["## Sample responses (held-out prompts)", "",
              "| prompt | SFT policy (before) | trained policy (after) |", "|---|---|---|"]
    for b, a in _samples(run["before"], run["after"], NUM_SAMPLES):
        lines.append(f"| {md_escape(b['prompt'])} | {md_escape(b['response'])}<br>*gold {b['gold']:.3f}, "
                     f"proxy {b['proxy']:.3f}* | {md_escape(a['response'])}<br>*gold {a['gold']:.3f}, "
                     f"proxy {a['proxy']:.3f}, KL {a['kl']:.3f}* |")
    if run["config"] is not None:
        longest = max((len(m) for m in re.findall(r"`+", run["config"])), default=0)
        fence = "`" * max(3, longest + 1)  # a fence longer than any backtick run inside
        lines += ["", "## Configuration", "", "<details><summary>config.yaml</summary>", "", fence + "yaml",
                  run["config"].rstrip("\n"), fence, "", "</details>"]
    return "\n".join(lines) + "\n"


def write_summary(run_dir: str | Path) -> Path:
    """Write ``run_dir/summary.md`` (headline table, plot links, before/after samples) and return its path."""
    run = load_run(run_dir)
    path = run["run_dir"] / "summary.md"
    path.write_text(_summary_markdown(run), encoding="utf-8")
    return path


def regenerate(run_dir: str | Path) -> list[Path]:
    """Plots and ``summary.md`` from a run folder; returns the written paths (plots first, summary last).

    Reads and validates every input first: an incomplete folder raises ``RlhfkitError`` naming the
    missing file and writes nothing.
    """
    run = load_run(run_dir)
    paths = _make_plots(run)
    summary = run["run_dir"] / "summary.md"
    summary.write_text(_summary_markdown(run), encoding="utf-8")
    return paths + [summary]
