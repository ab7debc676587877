"""The tensor side of a PPO iteration: the rollout-time forward passes (step 3) and the update loop (step 5).
The trainer (`ppo_trainer.py`) calls these with plain tensors, so a test can inject a fixed rollout.

Exactness of the first minibatch
--------------------------------
Floating-point results depend on batch composition (padding widths, matmul blocking). The old log-probs are
therefore computed over exactly the micro-batches that the first epoch's update will use (the epoch-0 plan is
drawn before the forward passes), with the same trimming (`rollout.forward.trim_batch`), the same model mode
(eval: dropout off, always) and the same autocast. The first minibatch of the first epoch then has ratio 1 and
approx-KL 0 exactly.

Data parallel
-------------
Each process holds its share of the rollout batch (``B_local = rollout_batch_size / num_processes`` rows, its
responses padded to the global longest ``T``). Statistics over the batch (score normalisation, reward and
advantage whitening) are computed on the gathered global batch; the token count that normalises the losses is
the minibatch's global count. Gradients are summed over processes with one all-reduce per optimizer step
(`train.engine.processes.Processes.sum_grads`; no DDP wrapper: the policy and critic stay plain modules so that
the same code runs with one process; ``--fsdp``: FSDP2 reduce-scatters the sharded models' gradients as a sum
instead, `sum_grads` skips them, and the clipping norm is global over the shards), and since every process's loss is already divided by the global token
count the sum is exactly the gradient of the whole minibatch.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, NamedTuple, Sequence

import torch
from torch import nn

from rlhfkit.core.kl import kl_k1, kl_loss
from rlhfkit.core.losses import (PolicyStats, ValueStats, entropy_bonus, explained_variance, ppo_policy_loss,
                                 ppo_total_loss, ppo_value_loss)
from rlhfkit.core.masks import aggregation_count, masked_mean, masked_sum, masked_var, masked_whiten
from rlhfkit.core.rewards import ShapedRewards
from rlhfkit.errors import RlhfkitError
from rlhfkit.models.trunk import Trunk
from rlhfkit.models.value_head import ValueHead
from rlhfkit.rollout.forward import (PolicyForward, TrimmedBatch, critic_forward, policy_forward,
                                     policy_value_forward, trim_batch)
from rlhfkit.train.engine.processes import Processes
from rlhfkit.train.engine.sharding import grad_norm, gradient_sync
from rlhfkit.train.engine.stats import NamedSums
from rlhfkit.train.ppo_trunk import TrunkStates


def global_whiten(x: torch.Tensor, mask: torch.Tensor, dist: Processes, shift_mean: bool = True) -> torch.Tensor:
    """`core.masks.masked_whiten` with the statistics of the whole (gathered) batch; returns this process's rows."""
    return dist.local(masked_whiten(dist.gather(x), dist.gather(mask.bool()), shift_mean=shift_mean))


def pad_columns(x: torch.Tensor, width: int, value: float | int | bool) -> torch.Tensor:
    """Right-pad dim 1 of ``x`` to ``width`` columns with ``value``."""
    missing = width - x.shape[1]
    if missing <= 0:
        return x
    return torch.cat([x, x.new_full((x.shape[0], missing, *x.shape[2:]), value)], dim=1)


# ----------------------------------------------------------------------------------------------------------
# The update plan: epochs -> minibatches -> micro-batches (row indices of this process's rows)
# ----------------------------------------------------------------------------------------------------------
def draw_plan(num_rows: int, ppo_epochs: int, num_minibatches: int,
              generator: torch.Generator) -> list[list[list[int]]]:
    """For each epoch, a fresh permutation of the rows cut into ``num_minibatches`` equal minibatches."""
    if num_rows % num_minibatches:
        raise RlhfkitError(f"each process holds {num_rows} rollout rows, not divisible by num_minibatches="
                           f"{num_minibatches}; make rollout_batch_size a multiple of num_minibatches x processes")
    size = num_rows // num_minibatches
    plan = []
    for _ in range(ppo_epochs):
        perm = torch.randperm(num_rows, generator=generator).tolist()
        plan.append([perm[i * size:(i + 1) * size] for i in range(num_minibatches)])
    return plan


def micro_batches(rows: Sequence[int], micro_batch_size: int) -> list[list[int]]:
    """Consecutive chunks of ``micro_batch_size`` rows (the last may be shorter)."""
    return [list(rows[i:i + micro_batch_size]) for i in range(0, len(rows), micro_batch_size)]


# ----------------------------------------------------------------------------------------------------------
# Step 3: rollout-time forward passes
# ----------------------------------------------------------------------------------------------------------
def policy_and_values(policy: nn.Module, critic: nn.Module | None, args: tuple[torch.Tensor, ...],
                      policy_trunk: Trunk | None = None, critic_trunk: Trunk | None = None, policy_pass: bool = True,
                      autocast_dtype: torch.dtype | None = None, packing: bool = False,
                      **kwargs: Any) -> tuple[PolicyForward | None, torch.Tensor | None]:
    """The policy's `policy_forward` (None with ``policy_pass=False``) and the values (B, T) of a micro-batch
    ``args = (query_ids, query_mask, response_ids, response_mask)``.

    ``critic`` a `ValueHead` (``critic=shared``): ONE forward of the policy gives both (`policy_value_forward`;
    it runs even with ``policy_pass=False``, the values need it). Else the policy's pass and the critic model's
    own pass (`critic_forward`), each from its trunk; ``critic=None`` (a critic-free estimator): no values (None).
    ``packing``: every pass padding-free packed where its model allows it. ``kwargs`` go to `policy_forward`."""
    if isinstance(critic, ValueHead):
        out, values = policy_value_forward(policy, critic, *args, autocast_dtype=autocast_dtype, trunk=policy_trunk,
                                           packing=packing, **kwargs)
        return (out if policy_pass else None), values
    out = policy_forward(policy, *args, autocast_dtype=autocast_dtype, trunk=policy_trunk, packing=packing,
                         **kwargs) if policy_pass else None
    if critic is None:
        return out, None
    return out, critic_forward(critic, *args, autocast_dtype=autocast_dtype, trunk=critic_trunk, packing=packing)


class RolloutForward(NamedTuple):
    """(B, T) old log-probs (None without the policy pass), reference log-probs and old values (None without a
    critic); (B, T, V) logits
    for the ``full`` KL; the trunks the update reuses (None when the plan holds none)."""

    old_logprobs: torch.Tensor | None
    ref_logprobs: torch.Tensor
    old_values: torch.Tensor | None
    logits: torch.Tensor | None
    ref_logits: torch.Tensor | None
    trunks: TrunkStates | None = None


def rollout_forward(
    policy: nn.Module,
    reference: nn.Module,
    reference_context: Callable[[], contextlib.AbstractContextManager],
    critic: nn.Module | None,
    query_ids: torch.Tensor,
    query_mask: torch.Tensor,
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
    groups: Iterable[Sequence[int]],
    temperature: float,
    autocast_dtype: torch.dtype | None = None,
    with_logits: bool = False,
    trunks: TrunkStates | None = None,
    policy_pass: bool = True,
    packing: bool = False,
) -> RolloutForward:
    """Old log-probs (policy), reference log-probs and old values (critic; a `ValueHead`: from the policy's
    pass, `policy_and_values`) of every row, no grad.

    ``groups`` are the micro-batches (row indices) of the first epoch, in order; each is trimmed exactly as the
    update will trim it. ``reference_context()`` wraps the reference pass (e.g. peft's ``disable_adapter``).
    ``trunks`` (`train.ppo_trunk.compute_trunks` of these rows): every pass runs from the frozen trunks, and they
    are returned for the update. ``policy_pass=False`` skips the policy's pass (``old_logprobs`` and
    ``logits`` are then None: the caller takes the sampler's log-probs). ``packing``: every pass padding-free
    packed where its model allows it (`policy_forward`), as the update's passes (the same micro-batches, the same
    layouts, so the first epoch's ratio is exactly 1).
    """
    B, T = response_ids.shape
    parts: list[tuple[list[int], Any, Any, Any, Any, Any, Any]] = []
    with torch.inference_mode():
        for rows in groups:
            idx = torch.tensor(rows, dtype=torch.long, device=query_ids.device)
            tb = trim_batch(query_ids[idx], query_mask[idx], response_ids[idx], response_mask[idx])
            args = (tb.query_ids, tb.query_mask, tb.response_ids, tb.response_mask)
            policy_trunk, critic_trunk = trunks.rows(idx, tb) if trunks is not None else (None, None)
            common = dict(temperature=temperature, with_logits=with_logits, autocast_dtype=autocast_dtype,
                          packing=packing)
            pf, values = policy_and_values(policy, critic, args, policy_trunk, critic_trunk, policy_pass, **common)
            with reference_context():
                rf = policy_forward(reference, *args, **common, trunk=trunks.reference_trunk(
                    policy_trunk, critic_trunk) if trunks is not None else None)
            logits = (tb.restore(pf.logits) if pf is not None else None, tb.restore(rf.logits)) if with_logits \
                else (None, None)
            parts.append((rows, tb.restore(pf.logprobs) if pf is not None else None, tb.restore(rf.logprobs),
                          tb.restore(values) if values is not None else None, *logits))
    # outside inference mode: fresh normal tensors, usable in autograd-recording ops later
    device = response_ids.device
    outputs: list[torch.Tensor | None] = []
    for k in range(5):
        first = parts[0][k + 1] if parts else None
        if first is None:  # logits unless requested, old log-probs without the policy pass, values without a
            # critic; else no rows at all
            absent = k >= 3 or (k == 0 and not policy_pass) or (k == 2 and critic is None)
            outputs.append(None if absent else torch.zeros(B, T, device=device))
            continue
        full = torch.zeros(B, *first.shape[1:], dtype=first.dtype, device=device)
        for part in parts:
            full[torch.tensor(part[0], dtype=torch.long, device=device)] = part[k + 1].clone()
        outputs.append(full)
    return RolloutForward(*outputs, trunks=trunks)


# ----------------------------------------------------------------------------------------------------------
# Step 5: the PPO update
# ----------------------------------------------------------------------------------------------------------
@dataclass
class UpdateBatch:
    """This process's rollout rows with everything the update needs; all (B, P) / (B, T); ``trunks``: the frozen
    trunks of the rows (`train.ppo_trunk`), which the update's forwards run from (None: the plain path).
    ``old_values`` and ``returns`` are None without a critic (a critic-free estimator); ``ref_logprobs`` is needed
    only with the KL in the loss (``UpdateSettings.kl_loss_coef``)."""

    query_ids: torch.Tensor
    query_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    old_logprobs: torch.Tensor
    old_values: torch.Tensor | None
    advantages: torch.Tensor
    returns: torch.Tensor | None
    trunks: TrunkStates | None = None
    ref_logprobs: torch.Tensor | None = None


@dataclass
class UpdateSettings:
    """The knobs of the update loop (a subset of `PPOConfig`)."""

    clip_range: float
    clip_range_value: float | None
    vf_coef: float
    entropy_coef: float
    temperature: float
    micro_batch_size: int
    max_grad_norm: float | None = None
    target_kl: float | None = None
    autocast_dtype: torch.dtype | None = None
    clip_range_low: float | None = None
    clip_range_high: float | None = None
    dual_clip: float | None = None
    loss_aggregation: str = "token_mean"
    max_length: int | None = None  # seq_mean_token_sum_norm's constant (max_new_tokens)
    kl_loss_coef: float | None = None  # the KL in the loss (k3 against ``UpdateBatch.ref_logprobs``); None: off
    packing: bool = False  # micro-batches padding-free packed where the models allow it (`policy_forward`)
    train_policy: bool = True  # False: a critic warm-up update (the value loss alone; no policy pass or step)

    def normalisers(self, num_tokens: torch.Tensor, num_sequences: torch.Tensor) -> dict[str, Any]:
        """The keyword normalisers of `core.masks.aggregate_token_losses` for ``loss_aggregation``, given the
        minibatch's global token and sequence counts."""
        if self.loss_aggregation == "token_mean":
            return {"num_tokens": num_tokens}
        if self.loss_aggregation == "seq_mean_token_mean":
            return {"num_sequences": num_sequences}
        return {"num_sequences": num_sequences, "max_length": self.max_length}


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _zero(*optimizers: torch.optim.Optimizer | None) -> None:
    for opt in optimizers:
        if opt is not None:
            opt.zero_grad(set_to_none=True)


def _clip_grads(policy_params: list[nn.Parameter], critic_params: list[nn.Parameter], max_norm: float,
                joint: bool) -> tuple[float, float]:
    """Clip the gradient norm to ``max_norm``: of each model apart, or with ``joint`` (``critic=shared``: one
    optimizer over policy and value head) of all parameters together, the one norm a single optimizer step sees.
    Returns (policy, critic) norms before clipping; with ``joint`` the policy's is the joint norm and the critic's
    the value head's own share of it."""
    if joint:
        v_norm = float(grad_norm(critic_params))
        params = policy_params + critic_params
        return (float(Processes.clip_grad_norm_(params, max_norm)) if params else 0.0), v_norm
    p_norm = float(Processes.clip_grad_norm_(policy_params, max_norm)) if policy_params else 0.0
    v_norm = float(Processes.clip_grad_norm_(critic_params, max_norm)) if critic_params else 0.0
    return p_norm, v_norm


def _micro_batch_loss(policy: nn.Module, critic: nn.Module | None, batch: UpdateBatch, rows: list[int],
                      num_tokens: torch.Tensor, settings: UpdateSettings,
                      num_sequences: torch.Tensor | None = None) -> tuple[torch.Tensor, NamedSums] | None:
    """The loss of one (trimmed) micro-batch, its token losses divided by the minibatch's global ``num_tokens``
    (the policy and KL losses: the normalisers of ``settings.loss_aggregation``, with the minibatch's global
    ``num_sequences``), and its statistics (`micro_batch_stats`); None without tokens. ``critic=None``: no value
    loss (and no value statistics)."""
    idx = torch.tensor(rows, dtype=torch.long, device=batch.response_ids.device)
    tb = trim_batch(batch.query_ids[idx], batch.query_mask[idx], batch.response_ids[idx], batch.response_mask[idx])
    args, t, mask = (tb.query_ids, tb.query_mask, tb.response_ids, tb.response_mask), tb.response_end, tb.response_mask
    n_local = int(mask.sum().item())
    if n_local == 0:
        return None
    policy_trunk, critic_trunk = batch.trunks.rows(idx, tb) if batch.trunks is not None else (None, None)
    if not settings.train_policy:
        return _critic_loss(critic, batch, idx, args, t, mask, critic_trunk, n_local, num_tokens, settings)
    with_entropy = settings.entropy_coef > 0
    # the entropy always (for the statistics; from the same pass over the logits as the log-probs)
    out, values = policy_and_values(policy, critic, args, policy_trunk, critic_trunk,
                                    temperature=settings.temperature, with_entropy=True,
                                    autocast_dtype=settings.autocast_dtype, packing=settings.packing)
    agg = dict(aggregation=settings.loss_aggregation, **settings.normalisers(num_tokens, num_sequences))
    p_loss, p_stats = ppo_policy_loss(out.logprobs, batch.old_logprobs[idx, :t], batch.advantages[idx, :t], mask,
                                      settings.clip_range, clip_range_low=settings.clip_range_low,
                                      clip_range_high=settings.clip_range_high, dual_clip=settings.dual_clip, **agg)
    v_loss, v_stats = None, None
    if critic is not None:
        v_loss, v_stats = ppo_value_loss(values, batch.old_values[idx, :t], batch.returns[idx, :t], mask,
                                         settings.clip_range_value, num_tokens)
    k_loss = None
    if settings.kl_loss_coef is not None:
        k_loss = kl_loss(out.logprobs, batch.ref_logprobs[idx, :t], mask, "k3", **agg)
    entropy = out.entropy if with_entropy else out.entropy.detach()  # without the bonus: statistics only
    ent = entropy_bonus(entropy, mask, num_tokens)
    loss = ppo_total_loss(p_loss, v_loss, ent, settings.vf_coef, settings.entropy_coef, k_loss,
                          settings.kl_loss_coef or 0.0)
    with torch.no_grad():
        losses = UpdateLosses(ent, p_loss, v_loss, -settings.entropy_coef * ent, loss, k_loss)
        return loss, micro_batch_stats(n_local, p_stats, v_stats, losses)


def _critic_loss(critic: nn.Module, batch: UpdateBatch, idx: torch.Tensor, args: tuple[torch.Tensor, ...], t: int,
                 mask: torch.Tensor, critic_trunk: Trunk | None, n_local: int, num_tokens: torch.Tensor,
                 settings: UpdateSettings) -> tuple[torch.Tensor, NamedSums]:
    """`_micro_batch_loss` of a critic warm-up update (``settings.train_policy`` False): the critic's pass alone
    and ``vf_coef`` × its value loss (`core.losses.ppo_total_loss` without policy and entropy terms); the
    statistics are the value ones and ``loss/value`` / ``loss/total`` (no ``policy/*``: no policy ran)."""
    _, values = policy_and_values(None, critic, args, critic_trunk=critic_trunk, policy_pass=False,
                                  autocast_dtype=settings.autocast_dtype, packing=settings.packing)
    v_loss, v_stats = ppo_value_loss(values, batch.old_values[idx, :t], batch.returns[idx, :t], mask,
                                     settings.clip_range_value, num_tokens)
    zero = torch.zeros((), dtype=v_loss.dtype, device=v_loss.device)
    loss = ppo_total_loss(zero, v_loss, zero, settings.vf_coef, 0.0)
    with torch.no_grad():
        return loss, micro_batch_stats(n_local, None, v_stats, UpdateLosses(None, None, v_loss, None, loss, None))


class UpdateLosses(NamedTuple):
    """A micro-batch's loss terms (0-dim), each already divided by the minibatch's global normaliser, so that their
    sums over micro-batches and processes are the minibatch's: the entropy bonus term, the policy loss, the value
    loss (None without a critic), ``-entropy_coef`` × the entropy, the total loss, the KL loss (None: off); a critic
    warm-up update has no entropy, policy loss nor entropy term (None)."""

    entropy: torch.Tensor | None
    policy: torch.Tensor | None
    value: torch.Tensor | None
    entropy_term: torch.Tensor | None
    total: torch.Tensor
    kl: torch.Tensor | None


def micro_batch_stats(n_local: int, policy: PolicyStats | None, value: ValueStats | None,
                      losses: UpdateLosses) -> NamedSums:
    """The named statistics of one micro-batch of ``n_local`` response tokens: the per-token statistics as
    token-weighted means (total = statistic × ``n_local``, weight ``n_local``: their minibatch value is the
    token-weighted mean; ``ratio_var`` that of the micro-batch variances), the losses as sums (``loss/kl`` 0 unless
    the KL is in the loss). Without a critic (``value`` None) no ``val/*`` nor ``loss/value``; without a policy pass
    (``policy`` None: a critic warm-up update) no ``policy/*``, ``loss/policy`` nor ``loss/entropy``."""
    sums = NamedSums()
    weighted = {} if policy is None else {
        "policy/approx_kl": policy.approx_kl, "policy/clipfrac": policy.clipfrac,
        "policy/ratio_mean": policy.ratio_mean, "policy/ratio_var": policy.ratio_var}
    if value is not None:
        weighted.update({"val/clipfrac": value.clipfrac, "val/error": value.error, "val/value_mean": value.value_mean})
    if policy is not None:
        weighted["policy/dual_clipfrac"] = policy.dual_clipfrac
    for name, stat in weighted.items():
        sums.add(name, stat.double() * n_local, n_local)
    summed = {"policy/entropy": losses.entropy, "loss/policy": losses.policy, "loss/value": losses.value,
              "loss/entropy": losses.entropy_term, "loss/total": losses.total, "loss/kl": losses.kl}
    for name, x in summed.items():
        if name == "loss/kl" and x is None:
            x = torch.zeros((), dtype=torch.float64)
        if x is not None:
            sums.add(name, x.detach().double())
    return sums


def ppo_update(
    policy: nn.Module,
    critic: nn.Module | None,
    policy_optimizer: torch.optim.Optimizer,
    critic_optimizer: torch.optim.Optimizer | None,
    batch: UpdateBatch,
    plan: list[list[list[int]]],
    settings: UpdateSettings,
    dist: Processes,
) -> list[dict[str, float]]:
    """``ppo_epochs × minibatches × micro-batches`` of clipped-PPO optimisation; returns per-minibatch stats.

    Per minibatch: the global response-token count N is all-reduced; each micro-batch (trimmed) computes
    ``ppo_total_loss`` with its token losses divided by N and back-propagates (gradient accumulation); gradients
    are summed over processes, each model's gradient norm is clipped to ``max_grad_norm``, both optimizers step.
    ``critic_optimizer=None`` (``critic=shared``: ``critic`` is a `ValueHead` whose parameters ``policy_optimizer``
    also holds): one norm over policy and head is clipped (`_clip_grads`) and the one optimizer steps.
    ``critic=None`` (a critic-free estimator, no critic optimizer): no value loss, and no ``val/*`` /
    ``loss/value`` statistics. The policy and KL losses are reduced by ``settings.loss_aggregation`` with the
    minibatch's global counts (`core.masks.aggregation_count` summed over micro-batches and processes), so the
    accumulated gradient is the whole minibatch's in every mode; ``loss/kl`` is 0 unless the KL is in the loss.
    A non-finite loss or gradient norm raises `RlhfkitError` before any optimizer step (gradients are cleared, so
    parameters and optimizer states are untouched). With ``target_kl``, a minibatch whose approx-KL exceeds it
    is not applied (its stats have ``applied = 0``) and the update ends. Both models stay in eval mode (dropout
    off) so that the update's forward passes match the rollout-time ones. Statistics are token-weighted means over
    the minibatch (``ratio_var`` is the token-weighted mean of the micro-batch variances); each dict also holds
    ``epoch``, ``minibatch``, ``num_tokens`` and ``applied``.
    ``settings.train_policy`` False (a critic warm-up iteration, ``critic_warmup_iterations``): each micro-batch
    runs the critic alone and back-propagates ``vf_coef`` × the value loss; only the critic's norm is clipped and
    only its optimizer steps (the policy's parameters, gradients and optimizer state are untouched); no
    ``policy/*`` statistics and no ``target_kl`` check (the policy does not move).
    """
    if not settings.train_policy and (critic is None or critic_optimizer is None):
        raise RlhfkitError("a critic warm-up update (train_policy=False) needs a separate critic and its optimizer")
    policy_params = _trainable(policy) if settings.train_policy else []
    critic_params = _trainable(critic) if critic is not None else []
    history: list[dict[str, float]] = []
    device = batch.response_ids.device
    for epoch, minibatches in enumerate(plan):
        for mb_index, rows in enumerate(minibatches):
            idx_all = torch.tensor(rows, dtype=torch.long, device=device)
            mb_mask = batch.response_mask[idx_all]
            num_tokens = dist.sum(mb_mask.sum().to(torch.float64))
            num_sequences = dist.sum(aggregation_count(mb_mask, "seq_mean_token_mean").to(torch.float64))
            n_global = float(num_tokens.item())
            if n_global == 0:
                raise RlhfkitError("a minibatch holds no response token (all responses empty)")
            sums = NamedSums()
            finite = True
            _zero(policy_optimizer, critic_optimizer)
            micros = micro_batches(rows, settings.micro_batch_size)
            for k, micro in enumerate(micros):
                result = _micro_batch_loss(policy, critic, batch, micro, num_tokens, settings, num_sequences)
                if result is None:
                    continue
                loss, micro_stats = result
                if not bool(torch.isfinite(loss.detach())):
                    finite = False
                    break
                with gradient_sync((policy, critic), k == len(micros) - 1):  # --fsdp: reduce-scatter once
                    loss.backward()
                sums.update(micro_stats)
            if not dist.all_true(finite):
                _zero(policy_optimizer, critic_optimizer)
                raise RlhfkitError(
                    f"non-finite PPO loss in epoch {epoch + 1}, minibatch {mb_index + 1}: the update was stopped "
                    f"before the optimizer step; check the reward scores (try score_norm/score_clip), lower the "
                    f"learning rate, or disable bf16")
            if not sums:  # no response token of this minibatch on this process: zero sums, the same names
                sums = _no_token_stats(critic is not None, settings.train_policy)
            stats = sums.reduce(dist).values()
            stats.update({"epoch": epoch, "minibatch": mb_index, "num_tokens": n_global})
            dist.sum_grads(policy_params)
            dist.sum_grads(critic_params)
            max_norm = settings.max_grad_norm if settings.max_grad_norm is not None else math.inf
            p_norm, v_norm = _clip_grads(policy_params, critic_params, max_norm, joint=critic_optimizer is None)
            if settings.train_policy:
                stats["policy/grad_norm"] = p_norm
            if critic is not None:
                stats["val/grad_norm"] = v_norm
            if not (math.isfinite(p_norm) and math.isfinite(v_norm)):
                _zero(policy_optimizer, critic_optimizer)
                raise RlhfkitError(
                    f"non-finite gradient norm (policy {p_norm}, critic {v_norm}) in epoch {epoch + 1}, minibatch "
                    f"{mb_index + 1}: the update was stopped before the optimizer step; lower the learning rate or "
                    f"disable bf16")
            history.append(stats)
            if settings.train_policy and settings.target_kl is not None and \
                    stats["policy/approx_kl"] > settings.target_kl:
                stats["applied"] = 0.0
                _zero(policy_optimizer, critic_optimizer)
                return history
            stats["applied"] = 1.0
            if settings.train_policy:
                policy_optimizer.step()
            if critic_optimizer is not None:
                critic_optimizer.step()
            _zero(policy_optimizer, critic_optimizer)
    return history


def _no_token_stats(with_critic: bool, with_policy: bool = True) -> NamedSums:
    """`micro_batch_stats` of a process without any response token in the minibatch: every statistic 0 (the same
    names as the other processes': ``with_policy`` False, a critic warm-up update's)."""
    zero = torch.zeros((), dtype=torch.float64)
    value = ValueStats(*[zero] * len(ValueStats._fields)) if with_critic else None
    policy = PolicyStats(*[zero] * len(PolicyStats._fields)) if with_policy else None
    term = zero if with_policy else None
    return micro_batch_stats(0, policy, value, UpdateLosses(term, term, zero if with_critic else None, term, zero,
                                                            None))


_BOOKKEEPING = ("epoch", "minibatch", "num_tokens", "applied")


def mean_stats(history: list[dict[str, float]]) -> dict[str, float]:
    """Mean of each per-minibatch statistic over the update, plus ``train/optimizer_steps`` and
    ``train/early_stopped``."""
    keys = [k for k in history[0] if k not in _BOOKKEEPING] if history else []
    out = {k: sum(h[k] for h in history) / len(history) for k in keys}
    applied = sum(h["applied"] for h in history)
    out["train/optimizer_steps"] = float(applied)
    out["train/early_stopped"] = float(applied < len(history))
    return out


def rollout_stats(
    dist: Processes,
    raw_scores: torch.Tensor,
    scores: torch.Tensor,
    shaped: ShapedRewards,
    kl_coef: float,
    old_logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    rollout_logprobs: torch.Tensor,
    old_values: torch.Tensor | None,
    returns: torch.Tensor | None,
    response_mask: torch.Tensor,
    stopped: torch.Tensor,
) -> dict[str, float]:
    """Batch statistics of the rollout over all processes (per-sequence sums averaged over the global batch).

    ``objective/kl``: mean Σ_t k1_t (`core.kl.kl_k1`, old minus reference log-prob: the sequence KL in nats,
    whatever ``kl_estimator`` shapes the reward; what the adaptive controller steers); ``objective/kl_penalty``:
    mean Σ_t KL_t of the reward's estimator; ``objective/non_score_reward``: mean Σ_t -kl_coef KL_t;
    ``objective/rlhf_reward``: mean Σ_t rewards_t (score + non-score reward); ``objective/scores``: mean raw
    reward-source score; ``objective/scores_used``: mean score entering the rewards (after penalty,
    normalisation, clipping); ``objective/entropy``: mean -Σ_t old log-prob (a sample estimate of the sequence
    entropy); ``val/*`` and ``returns/*`` over the response tokens (absent without a critic: ``old_values`` and
    ``returns`` None); ``rollout/logprob_diff``: mean
    |sampling-time - training-time log-prob| (numerical drift between the KV-cache sampler and the full forward).
    """
    mask = dist.gather(response_mask.bool())
    per_row = {  # per-sequence values, averaged over the global batch by name
        "objective/kl": masked_sum(kl_k1(old_logprobs, ref_logprobs), response_mask, dim=1),
        "objective/kl_penalty": masked_sum(shaped.kl, response_mask, dim=1),
        "objective/non_score_reward": masked_sum(shaped.non_score_reward, response_mask, dim=1),
        "objective/rlhf_reward": masked_sum(shaped.rewards, response_mask, dim=1),
        "objective/entropy": -masked_sum(old_logprobs, response_mask, dim=1),
        "response/length_mean": response_mask.sum(dim=1).to(old_logprobs.dtype),
        "response/stop_rate": stopped.to(old_logprobs.dtype),
    }
    sums = NamedSums()
    for name, x in per_row.items():
        sums.add(name, x.double().sum(), x.shape[0])
    out = sums.reduce(dist).values()
    raw, used = dist.gather(raw_scores.double()), dist.gather(scores.double())
    drift = dist.gather((rollout_logprobs.to(old_logprobs.dtype) - old_logprobs).abs())
    out.update({
        "objective/kl_coef": float(kl_coef),
        "objective/scores": float(raw.mean()),
        "objective/scores_std": float(raw.std()) if raw.numel() > 1 else 0.0,
        "objective/scores_used": float(used.mean()),
        "rollout/logprob_diff": float(masked_mean(drift, mask)),
    })
    if old_values is not None:
        values, rets = dist.gather(old_values), dist.gather(returns)
        out.update({"val/mean": float(masked_mean(values, mask)),
                    "val/explained_variance": float(explained_variance(values, rets, mask)),
                    "returns/mean": float(masked_mean(rets, mask)),
                    "returns/var": float(masked_var(rets, mask, unbiased=False))})
    return out
