"""The vLLM row of ``bench_generate.py``, run by the Python of a venv that has vllm (``--vllm-python``).

    VLLM_ENABLE_V1_MULTIPROCESSING=0 PYTHON _vllm_generate.py JOB.json

Reads the job file the benchmark wrote (model folder, prompt ids, EOS id, settings), builds ``vllm.LLM`` in this
process (``enforce_eager=True``, float32), generates with temperature 1, no top-k / top-p, EOS stop, once as a
warm-up and ``repeats`` times timed, and prints one ``BENCH_RESULT {json}`` line: the times and each row's response
length (vLLM's output token ids, which end with the EOS when the row stopped). It imports vllm and the benchmark's
own standard-library helpers only (``bench_generate.timed_calls``), never rlhfkit: torch is vllm's own.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
from bench_generate import timed_calls  # noqa: E402


def main(job_path: str) -> None:
    import vllm
    from vllm import LLM, SamplingParams

    with open(job_path) as f:
        job = json.load(f)
    llm = LLM(model=job["model"], dtype="float32", enforce_eager=True, seed=job["seed"],
              max_model_len=max(map(len, job["prompt_ids"])) + job["max_new_tokens"])
    prompts = [{"prompt_token_ids": ids} for ids in job["prompt_ids"]]

    def generate(seed: int) -> list[int]:
        params = SamplingParams(n=1, temperature=1.0, top_p=1.0, max_tokens=job["max_new_tokens"], seed=seed,
                                stop_token_ids=[job["eos"]])
        outputs = llm.generate(prompts, params, use_tqdm=False)
        return [len(o.outputs[0].token_ids) for o in outputs]

    C.emit({**timed_calls(generate, job), "vllm": vllm.__version__})


if __name__ == "__main__":
    main(sys.argv[1])
