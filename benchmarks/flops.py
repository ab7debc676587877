"""Model FLOPs of a decoder-only transformer (Llama-style), counted analytically from its shape and the REAL token
counts of a run, so that a phase's achieved GFLOP/s can be set against the machine's measured GEMM peak.

What is counted: the matrix multiplications only, each as 2 FLOPs per multiply-add (norms, activations, RoPE,
softmax and the embedding lookup are not matmuls and are left out; at these sizes they are a few percent).
Padding is never counted: the numbers are the work the real tokens need, whatever a library spends on padding,
finished rows or recomputation (that shows up as lower utilisation, which is the point).

Per block and token (H hidden, I intermediate, n heads, m kv heads, d head dim; multiply-adds):

- ``qkv``: H·n·d (q) + 2·H·m·d (k, v), the projections that read the block's input;
- ``rest``: n·d·H (o) + 3·H·I (SwiGLU MLP: gate, up, down);
- ``attention``: 2·n·d per (query, key) pair (scores q·kᵀ and values p·v, over every head), summed over the
  ACTUAL key length of each query: a causal forward over L tokens has Σ key lengths = L(L+1)/2; a decode step
  after k cached tokens has k + 1;

plus the LM head, H·V per position that gets logits (only those: the sampler asks for one position per step,
PPO's forwards for the response-predicting positions), or a scalar head (reward model, critic), H per position.

Backward (gradients flow from the loss down to the lowest trained parameter, nothing below it):

- a trained block: 2 × its forward (activation gradients + weight gradients; the attention core, which has no
  weights, has two operands to differentiate in each of its two products: also 2×). Even the lowest trained
  block's q/k/v projections need their input gradient: that input is the block's RMSNorm output, whose weight
  trains;
- the output head: its activation gradient (1 × its forward: the final norm below it always trains in rlhfkit,
  whose freezing never touches it), plus its weight gradient (another 1×) when the head trains; a frozen head
  above trained blocks thus costs 1 × forward (the brief's "frozen blocks above trainable ones");
- frozen blocks below every trained parameter: no backward at all.

``tests/test_benchmarks_smoke.py`` checks these rules against the matmul FLOPs torch's own counter
(``torch.utils.flop_counter``) records for a forward + backward of a real (tiny) transformers model.

In rlhfkit, ``freeze_layers = n > 0`` freezes the embeddings and the lowest n blocks (``freeze_lower_layers``); with
tied embeddings (SmolLM2) the LM head is the embedding matrix, hence frozen too: see :func:`policy_training`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, NamedTuple, Sequence


@dataclass(frozen=True)
class DecoderShape:
    """The sizes of a decoder that the FLOP count needs (``tied``: input and output embeddings share weights)."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool = True

    @classmethod
    def from_config(cls, cfg: Any) -> "DecoderShape":
        """From a transformers config (``hidden_size``, ``intermediate_size``, ... ; ``head_dim`` defaults to
        hidden / heads, ``num_key_value_heads`` to the heads) or a dict of this class's own field names."""
        if isinstance(cfg, dict):
            return cls(**cfg)
        heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        return cls(hidden=cfg.hidden_size, intermediate=cfg.intermediate_size, layers=cfg.num_hidden_layers,
                   heads=heads, kv_heads=getattr(cfg, "num_key_value_heads", None) or heads, head_dim=head_dim,
                   vocab=cfg.vocab_size, tied=bool(getattr(cfg, "tie_word_embeddings", False)))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class PassFlops(NamedTuple):
    """FLOPs of one pass through the model: per block (all blocks equal) and for the output head."""

    qkv: float        # per block: q, k, v projections
    rest: float       # per block: o projection and MLP
    attention: float  # per block: scores and values
    head: float       # LM head or scalar head

    def block(self) -> float:
        return self.qkv + self.rest + self.attention

    def total(self, layers: int) -> float:
        return layers * self.block() + self.head

    def __add__(self, other: "PassFlops") -> "PassFlops":  # type: ignore[override]
        return PassFlops(*(a + b for a, b in zip(self, other)))


def forward_pass(shape: DecoderShape, tokens: int, key_sum: int, head_positions: int, head_outputs: int) -> PassFlops:
    """FLOPs of a forward over ``tokens`` tokens whose key lengths sum to ``key_sum``, with a head of
    ``head_outputs`` outputs (V for an LM head, 1 for a scalar head) at ``head_positions`` positions."""
    s = shape
    qkv = s.hidden * s.head_dim * (s.heads + 2 * s.kv_heads)
    rest = s.heads * s.head_dim * s.hidden + 3 * s.hidden * s.intermediate
    return PassFlops(qkv=2.0 * tokens * qkv, rest=2.0 * tokens * rest,
                     attention=2.0 * key_sum * 2 * s.heads * s.head_dim,
                     head=2.0 * head_positions * s.hidden * head_outputs)


def causal_key_sum(new_tokens: int, past: int = 0) -> int:
    """Σ key lengths of ``new_tokens`` queries after ``past`` cached tokens: Σ_{i=1..n} (past + i)."""
    return new_tokens * past + new_tokens * (new_tokens + 1) // 2


def sequence_forward(shape: DecoderShape, length: int, head_positions: int, head_outputs: int) -> PassFlops:
    """A teacher-forced causal forward over one sequence of ``length`` real tokens."""
    return forward_pass(shape, length, causal_key_sum(length), head_positions, head_outputs)


def generation_flops(shape: DecoderShape, prompt_length: int, response_length: int) -> float:
    """Sampling ``response_length`` tokens (the last one included, e.g. the EOS) after a ``prompt_length`` prompt
    with a KV cache: the prefill over the prompt (logits at its last position) gives the first response token, then
    one decode step per further token, each a forward of one token over its real key length (logits at it).
    The last sampled token is never fed back. (Equal to one causal forward over ``prompt + response - 1`` tokens
    with logits at ``response_length`` positions: the cache changes when the work is done, not how much.)"""
    if response_length < 1:
        return 0.0
    flops = sequence_forward(shape, prompt_length, 1, shape.vocab).total(shape.layers)
    for j in range(1, response_length):  # feed response token j after prompt + j - 1 cached tokens
        flops += forward_pass(shape, 1, causal_key_sum(1, prompt_length + j - 1), 1, shape.vocab).total(shape.layers)
    return flops


def backward_flops(shape: DecoderShape, fwd: PassFlops, frozen_below: int, head_trained: bool) -> float:
    """FLOPs of the backward of a forward ``fwd`` (module docstring, "Backward"): the lowest ``frozen_below``
    blocks are frozen, the blocks above them train; ``head_trained``: the output head's weights train."""
    if not 0 <= frozen_below <= shape.layers:
        raise ValueError(f"frozen_below must be in [0, {shape.layers}], got {frozen_below}")
    return (shape.layers - frozen_below) * 2 * fwd.block() + fwd.head * (2 if head_trained else 1)


class Training(NamedTuple):
    """Which parts of a model train (see :func:`backward_flops`)."""

    frozen_below: int
    head_trained: bool


def policy_training(shape: DecoderShape, freeze_layers: int) -> Training:
    """rlhfkit's policy with ``freeze_layers`` (``freeze_lower_layers``: embeddings + lowest blocks; with tied
    embeddings the LM head is the embedding matrix, frozen with them)."""
    return Training(freeze_layers, head_trained=not (shape.tied and freeze_layers > 0))


def critic_training(freeze_layers: int) -> Training:
    """rlhfkit's critic with ``critic_freeze_layers`` (its scalar value head always trains)."""
    return Training(freeze_layers, head_trained=True)


def train_step_flops(shape: DecoderShape, fwd: PassFlops, training: Training) -> float:
    """Forward + backward of one pass."""
    return fwd.total(shape.layers) + backward_flops(shape, fwd, *training)


PPO_PHASES = ("generation", "score", "forward_policy", "forward_reference", "forward_critic", "update_policy",
              "update_critic")


def ppo_phase_flops(shape: DecoderShape, prompt_lengths: Sequence[int], response_lengths: Sequence[int],
                    ppo_epochs: int, policy_freeze_layers: int = 0, critic_freeze_layers: int = 0,
                    critic_shape: DecoderShape | None = None, reward_shape: DecoderShape | None = None
                    ) -> dict[str, float]:
    """Model FLOPs of one PPO iteration, by phase (keys :data:`PPO_PHASES`), from each row's real prompt and
    response token counts (the response up to and including its stop token).

    - ``generation``: :func:`generation_flops` per row;
    - ``score``: a reward-model forward over prompt + response (the response as sampled, its EOS included),
      the scalar head at one position (``last`` aggregation);
    - ``forward_policy`` / ``forward_reference``: a forward over prompt + response, LM head at the response
      positions; ``forward_critic``: the same with the scalar value head;
    - ``update_policy`` / ``update_critic``: ``ppo_epochs`` × (forward + backward) of those passes (every epoch
      visits every row once, however it is cut into minibatches and micro-batches).

    The critic and reward model default to the policy's shape (separate models on the same architecture).
    """
    if len(prompt_lengths) != len(response_lengths):
        raise ValueError(f"{len(prompt_lengths)} prompt lengths but {len(response_lengths)} response lengths")
    critic_shape = critic_shape or shape
    reward_shape = reward_shape or shape
    pol_train, cri_train = policy_training(shape, policy_freeze_layers), critic_training(critic_freeze_layers)
    out = dict.fromkeys(PPO_PHASES, 0.0)
    for p, r in zip(prompt_lengths, response_lengths):
        length = p + r
        policy = sequence_forward(shape, length, r, shape.vocab)
        critic = sequence_forward(critic_shape, length, r, 1)
        out["generation"] += generation_flops(shape, p, r)
        out["score"] += sequence_forward(reward_shape, length, 1, 1).total(reward_shape.layers)
        out["forward_policy"] += policy.total(shape.layers)
        out["forward_reference"] += policy.total(shape.layers)
        out["forward_critic"] += critic.total(critic_shape.layers)
        out["update_policy"] += ppo_epochs * train_step_flops(shape, policy, pol_train)
        out["update_critic"] += ppo_epochs * train_step_flops(critic_shape, critic, cri_train)
    return out


def group_flops(phases: dict[str, float], groups: dict[str, Sequence[str]]) -> dict[str, float]:
    """Phase FLOPs summed into named groups (e.g. a library's own timers)."""
    return {name: sum(phases[k] for k in keys) for name, keys in groups.items()}


# ----------------------------------------------------------------------------------------------------------
# The GEMMs a pass multiplies (for the machine's attainable throughput at the model's own shapes)
# ----------------------------------------------------------------------------------------------------------
class Gemm(NamedTuple):
    """One matrix product (M, K) @ (K, N), done ``count`` times per pass: 2·M·K·N·count FLOPs. ``transposed``:
    which operand is a transposed view of a contiguous matrix in the pass (``"b"``: a linear layer's ``Wᵀ``,
    ``"a"``: the output gradient in a weight gradient, ``""``: neither), so that a timing uses the real layout."""

    m: int
    k: int
    n: int
    count: int = 1
    transposed: str = ""

    def flops(self) -> float:
        return 2.0 * self.m * self.k * self.n * self.count


def pass_gemms(shape: DecoderShape, tokens: int, head_positions: int, backward: bool = False) -> list[Gemm]:
    """The weight matmuls of a pass over ``tokens`` tokens of every block, with the LM head at ``head_positions``
    positions (0: none), as (M, K, N) products. Forward: ``x (tokens, in) @ Wᵀ (in, out)`` per projection (q, k, v,
    o, gate, up, down) and ``(head_positions, H) @ (H, V)``. ``backward`` adds, per forward product (M, K, N), its
    input gradient (M, N) @ (N, K) and its weight gradient (N, M) @ (M, K): every block and the head train (a full
    fine-tuning step; the attention core, which has no weights, is not here).

    Their FLOPs equal :func:`forward_pass`'s ``qkv + rest`` per block and ``head`` (× 3 with ``backward``)."""
    s = shape
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    block = [(s.hidden, q), (s.hidden, kv), (s.hidden, kv), (q, s.hidden), (s.hidden, s.intermediate),
             (s.hidden, s.intermediate), (s.intermediate, s.hidden)]
    forward: list[tuple[int, int, int, int]] = [(tokens, k, n, s.layers) for k, n in block]
    if head_positions:
        forward.append((head_positions, s.hidden, s.vocab, 1))
    out = [Gemm(*g, transposed="b") for g in forward]
    if backward:
        out += [Gemm(m, n, k, c) for m, k, n, c in forward] + [Gemm(n, m, k, c, "a") for m, k, n, c in forward]
    return out
