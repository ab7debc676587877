"""Tolerances derived from float32 rounding, for tests that compare two float32 computations of the same quantity.

A comparison between two float32 paths (a batch vs its rows alone, micro-batches vs one batch, packed vs plain,
a merged adapter vs the adapted model, ...) may differ only by rounding, and rounding is bounded by the sizes of
the quantities involved, not by what one CPU's kernels happen to give:

* A sum of n float32 terms evaluated in two orders (another kernel, SIMD width, thread split, or batch shape)
  differs by at most a few ``eps · Σ|terms|``: the worst case is ``n·u`` per evaluation (u = eps/2), but the
  errors of a reduction are random-signed, so they grow like ``√n·u`` (Higham & Mary, "A new approach to
  probabilistic rounding error analysis", SISC 2019), and blocked / pairwise kernels add ``log2 n`` levels.
  The factor of each use counts the rounding stages (``log2`` of the reduction length, accumulation steps, ...).
* A network output carries the rounding of every stage it passed through, relative to the magnitude of that
  stage's values. The tiny test models are residual networks with a normalisation before each sublayer, so the
  error of an output is a few ``eps`` of the outputs' magnitude per sublayer: :func:`forward_factor`. A gradient
  adds the backward pass: :func:`gradient_factor`, relative to the terms its reduction over tokens adds
  (:func:`gradient_terms`), because a weight's gradient is a sum over tokens of products whose signs cancel.
* Training amplifies rounding (Adam's first steps move a weight by ±lr whatever the size of its gradient, so
  a gradient of rounding size can flip a whole step): compare gradients, the first step's update or the loss
  before the optimizer amplifies them, never weights after several steps with a fixed atol.

Exact equality is kept where it holds computationally too (same kernels, same shapes, same order). float64
models keep float64 tolerances; note that Llama's RMSNorm computes in float32 even in a float64 model, which two
float64 paths round identically unless a float64 difference (~1e-16 relative) straddles a float32 rounding
boundary (probability ~1e-9 per element).

Importable from any test as ``tolerances`` (``pythonpath = ["tests"]`` in pyproject.toml).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator

import torch
from torch import nn

EPS32 = torch.finfo(torch.float32).eps  # 2**-23 ≈ 1.19e-7: the spacing of float32 numbers at 1.0 (u = EPS32 / 2)


def _abs_sum(terms: torch.Tensor | Iterable[float] | float) -> float:
    t = terms if isinstance(terms, torch.Tensor) else torch.as_tensor(terms, dtype=torch.float64)
    return float(t.detach().double().abs().sum())


def sum_tolerance(terms: torch.Tensor | Iterable[float] | float, factor: float) -> float:
    """``factor · EPS32 · Σ|terms|``: how far two float32 evaluations of ``Σ terms`` (another order, other kernels,
    each term itself rounded by up to ``factor`` stages relative to its size) may differ. Terms of both signs count
    with their absolute values: a sum that cancels to a small total keeps the rounding of its large terms."""
    return factor * EPS32 * _abs_sum(terms)


def propagated_tolerance(value: torch.Tensor, inputs: torch.Tensor, factor: float) -> float:
    """``factor · EPS32 · Σ|∂value/∂x|·|x|`` over the float32 tensor ``inputs`` (x) that the scalar ``value`` is
    computed from: the first-order change of ``value`` when every x carries a rounding error of up to ``factor``
    eps relative to its size. For ``value = Σ x`` this is :func:`sum_tolerance`; for a difference of nearly equal
    x it is their Σ|x|, not the small difference; for a loss it weighs each x by the loss's sensitivity to it.
    Keeps the graph (``retain_graph``)."""
    (grad,) = torch.autograd.grad(value, inputs, retain_graph=True)
    return factor * EPS32 * float((grad.double() * inputs.detach().double()).abs().sum())


def forward_factor(num_layers: int) -> int:
    """Rounding stages between two float32 forwards of a residual network with ``num_layers`` blocks.

    Each block adds two sublayer outputs (attention, MLP) to the residual stream: one stage each, as the
    normalisation in front of a sublayer keeps its values at the stream's scale and its reductions (length ≤
    2·hidden = 64 in the test models) round by a few u of their terms, random-signed; the embedding, the final norm
    and the head add one more stage. Two evaluations, each with its own rounding: × 2.
    """
    return 2 * (2 * num_layers + 1)


def gradient_factor(num_layers: int) -> int:
    """Rounding stages between two float32 gradients: the forward to the parameter and the backward from the
    loss each pass through up to all the stages of :func:`forward_factor`."""
    return 2 * forward_factor(num_layers)


@contextmanager
def linear_terms(module: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Within the block, record for every call of the Linear ``module`` (a model's head) ``|x| @ |W|ᵀ (+ |b|)``: for
    each output, the Σ|terms| of the dot product that made it, the scale of its rounding (a random or trained head
    cancels: its outputs can be several times smaller than their terms)."""
    seen: list[torch.Tensor] = []

    def hook(m: nn.Module, args: tuple, out: torch.Tensor) -> None:
        terms = args[0].detach().abs().double() @ m.weight.detach().abs().double().T
        seen.append(terms + m.bias.detach().abs().double() if m.bias is not None else terms)

    handle = module.register_forward_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


def logprob_tolerance(logit_terms: torch.Tensor, logprobs: torch.Tensor, temperature: float,
                      network_factor: float) -> torch.Tensor:
    """Per token, how far two float32 evaluations of ``log_softmax(logits / T)[token]`` may differ.

    ``logit_terms`` (..., V): the Σ|terms| of the logits (:func:`linear_terms` of the LM head; or ``|logits|`` for
    logits given exactly); ``logprobs`` (...): the log-probs compared. With m the largest tempered logit term of the
    token's row: the network's rounding of the logits, ``network_factor`` eps of m (:func:`forward_factor`, or 1 for
    the float32 cast of a float64 model's logits), and the log-softmax's own, per evaluation in units of u = eps/2:
    tempering and the max-shift 3m, the sum of V exponentials ``log2 V`` levels, the log ``ln V``, the final
    subtraction ``|log-prob|``; two evaluations: × 2u = eps.
    """
    m = logit_terms.detach().double().amax(-1) / temperature
    vocab = logit_terms.shape[-1]
    return EPS32 * ((network_factor + 3) * m + logprobs.detach().double().abs() + math.log2(vocab) + math.log(vocab))


def gradient_terms(model: nn.Module, backward: Callable[[], object]) -> dict[str, float]:
    """Run ``backward()`` (a forward plus ``.backward()``) and return, per parameter name, the largest over the
    parameter's elements of ``Σ|terms|`` of its gradient's reduction over tokens (the scale of a gradient's
    rounding; a tensor-wise maximum, because the error of the upstream gradient δ spreads over all elements).

    Linear ``W``: ``|δ|ᵀ|x|`` summed over tokens (and ``Σ|δ|`` for a bias); Embedding: ``Σ|δ|`` per id; LayerNorm /
    RMSNorm weight: ``Σ|δ ⊙ x̂|`` (bias ``Σ|δ|``) with x̂ the normalised input. Other parameters with a gradient
    raise, so that no comparison silently goes without a scale. The gradients ``backward()`` leaves are the
    model's usual ones (the hooks only read).
    """
    totals: dict[str, torch.Tensor] = {}
    names = {id(p): n for n, p in model.named_parameters()}

    def add(param: torch.Tensor | None, value: torch.Tensor) -> None:
        if param is not None and param.requires_grad and id(param) in names:
            name = names[id(param)]
            totals[name] = totals.get(name, 0) + value

    def flat(t: torch.Tensor) -> torch.Tensor:
        return t.detach().double().abs().reshape(-1, t.shape[-1])

    def linear_grad(m: nn.Module, x: torch.Tensor, g: torch.Tensor) -> None:
        add(m.weight, flat(g).T @ flat(x))  # (out, in)
        add(getattr(m, "bias", None), flat(g).sum(0))

    def embedding_grad(m: nn.Module, ids: torch.Tensor, g: torch.Tensor) -> None:
        out = torch.zeros(m.weight.shape, dtype=torch.float64, device=g.device)
        add(m.weight, out.index_add_(0, ids.reshape(-1), flat(g)))

    def norm_grad(m: nn.Module, x: torch.Tensor, g: torch.Tensor) -> None:
        x = x.detach().double()
        eps = getattr(m, "variance_epsilon", getattr(m, "eps", 1e-6))
        if isinstance(m, nn.LayerNorm):
            x = x - x.mean(-1, keepdim=True)
        x_hat = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        add(m.weight, (flat(g) * x_hat.abs().reshape(-1, x.shape[-1])).sum(0))
        add(getattr(m, "bias", None), flat(g).sum(0))

    def conv1d_grad(m: nn.Module, x: torch.Tensor, g: torch.Tensor) -> None:  # transformers' Conv1D: x @ W + b
        add(m.weight, flat(x).T @ flat(g))  # (in, out)
        add(m.bias, flat(g).sum(0))

    def kind(m: nn.Module) -> Callable | None:
        if isinstance(m, nn.Linear):
            return linear_grad
        if isinstance(m, nn.Embedding):
            return embedding_grad
        if isinstance(m, nn.LayerNorm) or (type(m).__name__.endswith("RMSNorm") and hasattr(m, "weight")):
            return norm_grad
        if type(m).__name__ == "Conv1D":
            return conv1d_grad
        return None

    def forward_hook(m: nn.Module, args: tuple, out: torch.Tensor, fn: Callable) -> None:
        if isinstance(out, torch.Tensor) and out.requires_grad:
            x = args[0]
            out.register_hook(lambda g: fn(m, x, g))

    handles = []
    for module in model.modules():
        fn = kind(module)
        if fn is not None and any(p.requires_grad for p in module.parameters(recurse=False)):
            handles.append(module.register_forward_hook(lambda m, a, o, fn=fn: forward_hook(m, a, o, fn)))
    try:
        backward()
    finally:
        for h in handles:
            h.remove()
    missing = [n for n, p in model.named_parameters() if p.grad is not None and n not in totals]
    if missing:
        raise TypeError(f"gradient_terms has no rule for the gradient of {missing}")
    return {n: float(t.max()) for n, t in totals.items()}


def assert_close_f32(actual: torch.Tensor | float, expected: torch.Tensor | float,
                     scale: torch.Tensor | float, factor: float, what: str = "") -> None:
    """Assert ``|actual - expected| <= factor · EPS32 · scale`` elementwise (``scale`` a number or a tensor that
    broadcasts; ``factor`` 0 demands equality). The failure message gives the largest violation in units of
    ``EPS32 · scale`` against the allowed ``factor``: "n rounding stages where f were allowed"."""
    e = torch.as_tensor(expected).detach().double()
    s = torch.as_tensor(scale).detach().double().broadcast_to(e.shape)
    _check(actual, e, factor * EPS32 * s, what, lambda i: (
        f" = {_ratio(actual, e, s, i):.3g} × eps·scale (eps = {EPS32:.3g}, scale = {s.flatten()[i].item():.3g}), "
        f"allowed {factor} × eps·scale"))


def assert_within(actual: torch.Tensor | Iterable[float], expected: torch.Tensor | Iterable[float],
                  tolerance: torch.Tensor | Iterable[float] | float, what: str = "") -> None:
    """Assert ``|actual - expected| <= tolerance`` elementwise, for tolerances already derived (e.g. a list of
    :func:`sum_tolerance` / :func:`propagated_tolerance` values, 0 where equality is exact)."""
    e = torch.as_tensor(expected).detach().double()
    _check(actual, e, torch.as_tensor(tolerance, dtype=torch.float64).broadcast_to(e.shape), what,
           lambda i: ", allowed")


def _ratio(actual, expected: torch.Tensor, scale: torch.Tensor, i: int) -> float:
    a = torch.as_tensor(actual).detach().double().flatten()[i]
    s = scale.flatten()[i]
    error = (a - expected.flatten()[i]).abs()
    return float(error / (EPS32 * s)) if s > 0 else (math.inf if error > 0 else 0.0)


def _check(actual, expected: torch.Tensor, bound: torch.Tensor, what: str, explain: Callable[[int], str]) -> None:
    a = torch.as_tensor(actual).detach().double()
    assert a.shape == expected.shape, f"{what}: shape {tuple(a.shape)} != {tuple(expected.shape)}"
    error = (a - expected).abs()
    over = ~(error <= bound)  # NaN counts as beyond
    if bool(over.any()):
        i = int(torch.argmax(torch.where(over, error - bound, -math.inf).nan_to_num(math.inf)))
        idx = tuple(int(k) for k in torch.unravel_index(torch.tensor(i), expected.shape)) if expected.dim() else ()
        raise AssertionError(
            f"{what + ': ' if what else ''}{int(over.sum())} of {expected.numel()} element(s) beyond float32 "
            f"rounding; at {idx}: |{a.flatten()[i].item():.9g} - {expected.flatten()[i].item():.9g}| = "
            f"{error.flatten()[i].item():.3g}{explain(i)} = {bound.flatten()[i].item():.3g}")


def float64_rms_norm(self, x: torch.Tensor) -> torch.Tensor:
    """``LlamaRMSNorm.forward`` without its float32 cast (monkeypatch it in): the cast rounds a float64 model's
    activations and gradients to float32 size wherever two float64 paths differ by a 1e-16 reordering (another
    batch shape, a shared prompt's summed gradient), so float64 comparisons of such paths patch it out."""
    return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))
