"""Frozen trunks computed once per rollout (``reuse_frozen_trunk``).

With ``freeze_layers = k`` the policy's embeddings and lowest k blocks never change, so their output (the
"trunk", `models.trunk`) depends on the tokens only. Per rollout it is computed once for every row, without
gradients, and then serves

* the policy's old log-probs and every epoch's forward: the policy runs only blocks k..N (with gradients in the
  update; none flow into the frozen blocks anyway);
* the reference log-probs: the reference (a copy of the initial policy) has the very same lowest k blocks, so
  it runs only its blocks k..N on the policy's trunk; or, when the critic's trunk is deeper (c > k) and the
  reference's lowest c blocks equal the critic's (a critic from the policy, or from a reward model trained from it
  with those blocks frozen, as in the quickstart), only its blocks c..N on the critic's trunk;
* the critic, with ``critic_freeze_layers = c``: its own trunk after c blocks is likewise computed once; when its
  embeddings and lowest blocks are bit-identical to the policy's (``critic_init=policy``, or a reward model
  trained with those blocks frozen), its trunk continues from the policy's hidden states after
  ``j = min(k, c)`` (or fewer: as many leading blocks as are identical) blocks instead of from the tokens.

Which of these apply is decided by `plan_trunks` from the models themselves: a model that `rollout.forward.
trunk_decoder` does not accept (LoRA / peft, DistributedDataParallel, a logit transform, an architecture outside
`models.trunk.SUPPORTED`), blocks that are not frozen, or a reference / critic whose blocks differ from the
policy's (``torch.equal`` on every parameter, the same configuration and rotary tables) take the plain path
for that part. `TrunkSharing` re-plans only when one of those parameters changes (its storage, dtype, device,
``requires_grad`` or in-place version counter), so the equality check runs once per run in practice.

With ``reuse_rollout_states`` the built-in sampler keeps the policy's states after the first ``plan.base_depth``
blocks of every token it feeds (`rollout.sampling.HiddenCapture`): they are that part of the trunk already, so
`compute_trunks` starts from them (``base``) and runs only the blocks above (none for the policy when the
critic shares all of its frozen blocks, as in the quickstart). They equal the plain forward's states up to the
float rounding of the sampler's other shapes (a KV cache, one token per step).

The trunks are computed over the first epoch's micro-batches (trimmed as the update trims them, see
`ppo_update`), so the first minibatch still has ratio 1 exactly, and stored in the (B, P + T, H) layout of the
update batch (`TrunkStates`); a later epoch's micro-batch takes its rows and its trimmed columns from there.
Every model sees exactly the tokens and positions of the plain path; the results differ from it only by the
float rounding of computing the lower blocks in another batch shape. Memory: one (B, P + T, H) tensor per
trunk (policy, critic) for the iteration.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple, Sequence

import torch
from torch import nn

from rlhfkit.models.trunk import Trunk, embedding_and_blocks, named_parameters, num_blocks, shared_depth
from rlhfkit.rollout.forward import TrimmedBatch, trim_batch, trunk_decoder, trunk_forward

@dataclass(frozen=True)
class TrunkPlan:
    """Which trunks a rollout computes. ``policy`` = k and ``critic`` = c: blocks run once per rollout (0: that
    model takes the plain path); ``reference``: the reference runs its blocks k..N on the policy's trunk;
    ``shared`` = j: the critic's trunk continues from the policy's hidden states after j blocks (0: from its own
    embeddings); ``reference_critic``: the reference runs its blocks c..N on the critic's trunk instead (c > k)."""

    policy: int = 0
    reference: bool = False
    critic: int = 0
    shared: int = 0
    reference_critic: bool = False

    @property
    def base_depth(self) -> int:
        """Blocks of the policy that run first from the tokens (the shared stage, else the policy's trunk; 0:
        none): the depth of a ``base`` from the sampler's states."""
        return self.shared or self.policy

    def compute(self, policy: nn.Module, critic: nn.Module, query_ids: torch.Tensor, query_mask: torch.Tensor,
                response_ids: torch.Tensor, response_mask: torch.Tensor,
                autocast_dtype: torch.dtype | None = None, base: Trunk | None = None
                ) -> tuple[Trunk | None, Trunk | None]:
        """The policy's and the critic's trunks of one (trimmed) micro-batch (None where not planned); ``base``:
        the policy's states after its first `base_depth` blocks for this micro-batch, which then do not run."""
        args = (query_ids, query_mask, response_ids, response_mask)
        if base is not None and (base.layers != self.base_depth or base.hidden.shape[:2] != (
                query_ids.shape[0], query_ids.shape[1] + response_ids.shape[1])):
            raise ValueError(f"a base of {base.layers} blocks and shape {tuple(base.hidden.shape)} for a plan "
                             f"starting with {self.base_depth} blocks and a batch of "
                             f"{tuple(query_ids.shape)} + {tuple(response_ids.shape)}")
        if self.shared:
            shared = base if base is not None else trunk_forward(policy, *args, layers=self.shared,
                                                                  autocast_dtype=autocast_dtype)
        else:
            shared = base  # None, or the policy's own trunk
        policy_trunk = critic_trunk = None
        if self.policy:
            policy_trunk = shared if shared is not None and shared.layers == self.policy else trunk_forward(
                policy, *args, layers=self.policy, base=shared, autocast_dtype=autocast_dtype)
        if self.critic:
            critic_trunk = trunk_forward(critic, *args, layers=self.critic, base=shared if self.shared else None,
                                         autocast_dtype=autocast_dtype)
        return policy_trunk, critic_trunk


class TrunkStates(NamedTuple):
    """The trunks of one rollout, (B, P + T, H) in the layout of the update batch (P = its query width);
    ``reference``: the trunk the reference runs from, ``"policy"``, ``"critic"`` (`TrunkPlan.reference`,
    ``reference_critic``) or None."""

    policy: Trunk | None
    critic: Trunk | None
    query_width: int
    reference: str | None = None

    def reference_trunk(self, policy_trunk: Trunk | None, critic_trunk: Trunk | None) -> Trunk | None:
        """Of a micro-batch's trunks (`rows`), the one the reference runs from (None: its plain path)."""
        return {"policy": policy_trunk, "critic": critic_trunk}.get(self.reference)

    def rows(self, idx: torch.Tensor, tb: TrimmedBatch) -> tuple[Trunk | None, Trunk | None]:
        """The trunks of the rows ``idx`` for their trimmed micro-batch ``tb`` (its kept columns)."""
        cols = slice(tb.query_start, self.query_width + tb.response_end)
        return tuple(None if t is None else Trunk(t.hidden[idx, cols], t.layers) for t in (self.policy, self.critic))


def compute_trunks(plan: TrunkPlan, policy: nn.Module, critic: nn.Module | None, query_ids: torch.Tensor,
                   query_mask: torch.Tensor, response_ids: torch.Tensor, response_mask: torch.Tensor,
                   groups: Sequence[Sequence[int]], autocast_dtype: torch.dtype | None = None,
                   base: Trunk | None = None) -> TrunkStates | None:
    """The planned trunks of a rollout (query (B, P) left-padded, response (B, T) right-padded), computed without
    gradients over ``groups`` (the first epoch's micro-batches, each trimmed as the update trims it) and assembled
    into `TrunkStates`; None when the plan computes none. ``base``: the policy's states (B, P + T, H) after its
    first ``plan.base_depth`` blocks (the sampler's, module docstring): those blocks then do not run."""
    if not (plan.policy or plan.critic):
        return None
    B, P, T = query_ids.shape[0], query_ids.shape[1], response_ids.shape[1]
    if base is not None and base.hidden.shape[:2] != (B, P + T):
        raise ValueError(f"base states {tuple(base.hidden.shape)} for a batch of {B} rows of {P} + {T} tokens")
    parts = []
    with torch.inference_mode():
        for rows in groups:
            idx = torch.tensor(list(rows), dtype=torch.long, device=query_ids.device)
            tb = trim_batch(query_ids[idx], query_mask[idx], response_ids[idx], response_mask[idx])
            part = None if base is None else Trunk(base.hidden[idx, tb.query_start:P + tb.response_end], base.layers)
            trunks = plan.compute(policy, critic, tb.query_ids, tb.query_mask, tb.response_ids, tb.response_mask,
                                  autocast_dtype=autocast_dtype, base=part)
            parts.append((list(rows), tb, *trunks))
    # outside inference mode: normal tensors, usable by the update's autograd-recording forwards
    policy_states = assemble([(rows, tb, p) for rows, tb, p, _ in parts], B, P, T)
    critic_states = assemble([(rows, tb, c) for rows, tb, _, c in parts], B, P, T)
    reference = "critic" if plan.reference_critic else "policy" if plan.reference else None
    return TrunkStates(policy_states, critic_states, P, reference)


def assemble(parts: list[tuple[list[int], TrimmedBatch, Trunk | None]], num_rows: int, query_width: int,
             response_width: int) -> Trunk | None:
    """One (B, P + T, H) trunk from the trunks of trimmed micro-batches (rows, their trim, their trunk); columns a
    micro-batch trimmed stay 0 (padding of those rows, never attended to). Outside ``inference_mode`` this gives
    a normal tensor, usable by the update's autograd-recording forward."""
    present = [p for p in parts if p[2] is not None]
    if not present:
        return None
    first = present[0][2]
    hidden = first.hidden.new_zeros((num_rows, query_width + response_width, first.hidden.shape[-1]))
    for rows, tb, trunk in present:
        idx = torch.tensor(rows, dtype=torch.long, device=hidden.device)
        hidden[idx, tb.query_start:query_width + tb.response_end] = trunk.hidden.clone()
    return Trunk(hidden, first.layers)


# ----------------------------------------------------------------------------------------------------------
# Planning
# ----------------------------------------------------------------------------------------------------------
def _frozen(decoder: nn.Module, layers: int) -> bool:
    return all(not p.requires_grad for _, p in named_parameters(embedding_and_blocks(decoder, layers)))


def plan_trunks(policy: nn.Module, reference: nn.Module, critic: nn.Module | None, policy_layers: int,
                critic_layers: int) -> TrunkPlan:
    """The `TrunkPlan` for these models with ``freeze_layers = policy_layers`` and ``critic_freeze_layers =
    critic_layers`` (the module docstring says when each part applies)."""
    decoder = trunk_decoder(policy)
    critic_decoder = trunk_decoder(critic) if critic is not None else None  # None: a critic-free estimator
    k = policy_layers if decoder is not None and 0 < policy_layers <= num_blocks(decoder) else 0
    if k and not _frozen(decoder, k):
        k = 0
    c = critic_layers if critic_decoder is not None and 0 < critic_layers <= num_blocks(critic_decoder) else 0
    if c and not _frozen(critic_decoder, c):
        c = 0
    reference_decoder = trunk_decoder(reference) if k or c else None
    share_reference = bool(k) and reference_decoder is not None and shared_depth(decoder, reference_decoder, k) == k
    from_critic = c > k and reference_decoder is not None and shared_depth(reference_decoder, critic_decoder, c) == c
    j = shared_depth(decoder, critic_decoder, min(k, c)) if k and c else 0
    return TrunkPlan(policy=k, reference=share_reference, critic=c, shared=j, reference_critic=from_critic)


class TrunkSharing:
    """`plan_trunks` for a run, re-planned only when a parameter it depends on changed (see the module docstring);
    ``enabled=False`` (``reuse_frozen_trunk=False``) plans nothing."""

    def __init__(self, enabled: bool, policy_layers: int, critic_layers: int) -> None:
        self.enabled = enabled
        self.policy_layers = policy_layers
        self.critic_layers = critic_layers
        self._key: tuple | None = None
        self._plan = TrunkPlan()

    def _signature(self, policy: nn.Module, reference: nn.Module, critic: nn.Module) -> tuple:
        parts: list[Any] = [id(policy), id(reference), id(critic)]
        for model, layers in ((policy, self.policy_layers),
                              (reference, max(self.policy_layers, self.critic_layers)), (critic, self.critic_layers)):
            decoder = trunk_decoder(model) if model is not None else None
            parts.append(None if decoder is None else id(decoder))
            if decoder is not None:
                modules = embedding_and_blocks(decoder, min(layers, num_blocks(decoder)))
                parts.extend((id(p), p.data_ptr(), p.dtype, p.device, p.requires_grad, p._version)
                             for _, p in named_parameters(modules))
        return tuple(parts)

    def plan(self, policy: nn.Module, reference: nn.Module, critic: nn.Module) -> TrunkPlan:
        if not self.enabled or not (self.policy_layers or self.critic_layers):
            return TrunkPlan()
        key = self._signature(policy, reference, critic)
        if key != self._key:
            self._plan = plan_trunks(policy, reference, critic, self.policy_layers, self.critic_layers)
            self._key = key
        return self._plan
