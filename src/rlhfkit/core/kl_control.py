"""Controllers for the KL coefficient ``kl_coef`` (β) of the shaped reward."""

from __future__ import annotations

import math


class FixedKLController:
    """A constant ``kl_coef``; :meth:`update` does nothing.

    Source: the fixed-β setting of Ziegler et al. 2019 §2.2 / Ouyang et al. 2022.
    """

    def __init__(self, kl_coef: float) -> None:
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """No-op (the coefficient is fixed)."""

    def state_dict(self) -> dict[str, float]:
        """``{"value": float}``."""
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Restore :meth:`state_dict`."""
        self.value = float(state["value"])


class AdaptiveKLController:
    """Proportional controller that steers the measured KL towards ``target``.

    Equation: ``e = clip(KL / target - 1, -0.2, 0.2)``, ``β ← β (1 + e · n_steps / horizon)``, where
    ``n_steps`` is the number of samples (episodes) since the last update.
    Source: Ziegler et al. 2019, "Fine-tuning language models from human preferences", §2.2 (with
    ``K_β = 0.1``, the rate being ``n_steps / horizon``).
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float) -> None:
        if not (target > 0 and horizon > 0):
            raise ValueError(f"target ({target}) and horizon ({horizon}) must be > 0")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Apply one controller step for a measured ``current_kl`` over ``n_steps`` samples."""
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        """``{"value": float}`` (target and horizon come from the configuration)."""
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Restore :meth:`state_dict`."""
        self.value = float(state["value"])


def make_kl_controller(
    kl_coef: float, adaptive: bool, target: float | None = None, horizon: float | None = None
) -> FixedKLController | AdaptiveKLController:
    """Build the KL controller of a PPO run, validating its settings.

    Raises ValueError for a negative or non-finite ``kl_coef``, and, when ``adaptive``, for
    ``kl_coef <= 0`` (a zero coefficient could never move), ``target <= 0`` or ``horizon <= 0``.
    Source: Ziegler et al. 2019 §2.2.
    """
    if not (math.isfinite(kl_coef) and kl_coef >= 0):
        raise ValueError(f"kl_coef must be a finite number >= 0, got {kl_coef}")
    if not adaptive:
        return FixedKLController(kl_coef)
    if kl_coef <= 0:
        raise ValueError("adaptive KL control needs an initial kl_coef > 0 (0 would never change)")
    if target is None or not target > 0:
        raise ValueError(f"adaptive KL control needs a target KL > 0, got {target}")
    if horizon is None or not horizon > 0:
        raise ValueError(f"adaptive KL control needs a horizon > 0, got {horizon}")
    return AdaptiveKLController(kl_coef, target, horizon)
