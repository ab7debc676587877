"""KL controllers: hand-computed adaptive updates (Ziegler et al. 2019 §2.2), state, validation."""

import json

import pytest

from rlhfkit.core.kl_control import AdaptiveKLController, FixedKLController, make_kl_controller


def test_adaptive_controller_hand_values_including_both_clips():
    ctl = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10000)
    # KL 9: 9/6 - 1 = 0.5 -> clipped to +0.2; β = 0.1 · (1 + 0.2 · 256/10000) = 0.1 · 1.00512 = 0.100512
    ctl.update(9.0, 256)
    assert ctl.value == pytest.approx(0.100512, abs=1e-15)
    # KL 3: 3/6 - 1 = -0.5 -> clipped to -0.2; β = 0.100512 · (1 - 0.2 · 512/10000) = 0.100512 · 0.98976
    #   = 0.09948275712
    ctl.update(3.0, 512)
    assert ctl.value == pytest.approx(0.09948275712, abs=1e-15)
    # KL 6.6: error 0.1 (inside the clip); β · (1 + 0.1 · 1000/10000) = 0.09948275712 · 1.01 = 0.1004775846912
    ctl.update(6.6, 1000)
    assert ctl.value == pytest.approx(0.1004775846912, abs=1e-15)
    # KL on target: error 0, unchanged
    ctl.update(6.0, 1000)
    assert ctl.value == pytest.approx(0.1004775846912, abs=1e-15)


def test_state_round_trip_and_fixed_controller():
    ctl = AdaptiveKLController(0.2, 6.0, 100)
    ctl.update(12.0, 10)  # 0.2 · (1 + 0.2 · 0.1) = 0.204
    resumed = AdaptiveKLController(0.2, 6.0, 100)
    resumed.load_state_dict(json.loads(json.dumps(ctl.state_dict())))
    assert resumed.value == pytest.approx(0.204, abs=1e-15)
    resumed.update(0.0, 10)  # error -1 -> -0.2: 0.204 · 0.98 = 0.19992
    assert resumed.value == pytest.approx(0.19992, abs=1e-15)

    fixed = FixedKLController(0.05)
    fixed.update(100.0, 1000)
    assert fixed.value == 0.05
    other = FixedKLController(1.0)
    other.load_state_dict(json.loads(json.dumps(fixed.state_dict())))
    assert other.value == 0.05


def test_make_kl_controller_and_validation():
    assert isinstance(make_kl_controller(0.05, adaptive=False), FixedKLController)
    ctl = make_kl_controller(0.05, adaptive=True, target=6.0, horizon=10000)
    assert isinstance(ctl, AdaptiveKLController) and ctl.value == 0.05
    with pytest.raises(ValueError, match="kl_coef"):
        make_kl_controller(-0.1, adaptive=False)
    with pytest.raises(ValueError, match="kl_coef > 0"):
        make_kl_controller(0.0, adaptive=True, target=6.0, horizon=10000)
    with pytest.raises(ValueError, match="target"):
        make_kl_controller(0.05, adaptive=True, target=0.0, horizon=10000)
    with pytest.raises(ValueError, match="target"):
        make_kl_controller(0.05, adaptive=True, target=None, horizon=10000)
    with pytest.raises(ValueError, match="horizon"):
        make_kl_controller(0.05, adaptive=True, target=6.0, horizon=0)
