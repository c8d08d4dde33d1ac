"""Linear CKA (blindnet.metrics.linear_cka) on cases whose answer is known in closed form."""

from __future__ import annotations

import math

import pytest
import torch

from blindnet.metrics import linear_cka


def _features(n: int = 500, p: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, p, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_cka_is_one_under_rotation_scaling_and_shift() -> None:
    x = _features()
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    # float64 throughout: the only error is rounding of sums of ~500 terms, far below 1e-12.
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(x, 3.0 * x @ q + 5.0) == pytest.approx(1.0, abs=1e-12)


def test_cka_of_a_subspace_has_a_closed_form() -> None:
    # x has 8 columns with (nearly) equal variance; y keeps k of them. With orthogonal columns of equal norm,
    # ||Y^T X||^2 = k s^2, ||X^T X|| = sqrt(8) s, ||Y^T Y|| = sqrt(k) s, so CKA = sqrt(k / 8).
    x = torch.linalg.qr(_features() - _features().mean(0))[0] * 10.0
    for k in (1, 2, 4):
        assert linear_cka(x, x[:, :k]) == pytest.approx(math.sqrt(k / 8), abs=1e-12)


def test_independent_features_score_near_zero_and_maps_are_read_per_pixel() -> None:
    a, b = _features(4000, 8, 2), _features(4000, 8, 3)
    # For independent Gaussian features E[CKA] ~ p/n = 0.002; 0.02 is ten times that.
    assert linear_cka(a, b) < 0.02
    maps = torch.randn(2, 8, 5, 7, generator=torch.Generator().manual_seed(4))
    flat = maps.permute(0, 2, 3, 1).reshape(-1, 8)
    assert linear_cka(maps, maps * 2) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(maps, maps[:, :3]) == pytest.approx(linear_cka(flat, flat[:, :3]), abs=1e-12)


def test_cka_refuses_mismatched_or_constant_inputs() -> None:
    with pytest.raises(ValueError, match="same n"):
        linear_cka(_features(10), _features(11))
    with pytest.raises(ValueError, match="share N, H, W"):
        linear_cka(torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 4, 5))
    with pytest.raises(ValueError, match="constant"):
        linear_cka(torch.ones(10, 3), _features(10, 3))
