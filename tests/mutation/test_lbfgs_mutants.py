"""L-BFGS workspace seeding (warm start): which pairs are kept, with which caches and scale.

``_Workspace.seed`` loads an :class:`LBFGSMemory` (e.g. the previous HOAG iteration's): the
newest ``m`` pairs, without the pairs of non-positive (or too small) curvature, with ``γ`` when
``scale_gamma``; the exported inverse must equal an :class:`LBFGSInverse` built directly from
the pairs that should have been kept.
"""

from __future__ import annotations

import pytest
import torch

from shine.solvers.lbfgs import LBFGSInverse, LBFGSMemory, _upper_sty, _Workspace

DT = torch.float64


def pairs(k, dim=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(dim, dim, dtype=DT, generator=gen)
    A = A @ A.T + dim * torch.eye(dim, dtype=DT)  # SPD: sᵀy > 0
    s = torch.randn(k, dim, dtype=DT, generator=gen)
    return s, s @ A


@pytest.mark.parametrize("caches", [False, True])
@pytest.mark.parametrize("scale_gamma", [False, True])
def test_seed_keeps_the_newest_m_pairs(caches, scale_gamma):
    s, y = pairs(6)
    extra = dict(sty_upper=_upper_sty(s, y), yty=y @ y.T) if caches else {}
    memory = LBFGSMemory(s, y, None, 0.7, **extra)
    ws = _Workspace(5, 4, DT, torch.device("cpu"))
    assert ws.seed(memory, curvature_check=True, scale_gamma=scale_gamma) == 0
    kept, inverse = ws.export()
    torch.testing.assert_close(kept.s, s[-4:], rtol=0, atol=0)
    torch.testing.assert_close(kept.y, y[-4:], rtol=0, atol=0)
    gamma = 0.7 if scale_gamma else 1.0
    assert kept.gamma == gamma and kept.kinds == ["regular"] * 4
    ref = LBFGSInverse(s[-4:], y[-4:], gamma)
    torch.testing.assert_close(inverse.dense(), ref.dense(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(kept.yty, y[-4:] @ y[-4:].T, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("curvature_check", [False, True])
def test_seed_drops_pairs_of_bad_curvature(curvature_check):
    s, y = pairs(5)
    y = y.clone()
    y[1] = -y[1]  # negative curvature: dropped by both tests
    y[3] = 0.0  # zero curvature
    kinds = ["regular", "regular", "opa", "regular", "regular"]
    memory = LBFGSMemory(s, y, kinds, 1.0, sty_upper=_upper_sty(s, y), yty=y @ y.T)
    ws = _Workspace(5, 10, DT, torch.device("cpu"))
    n_rejected = ws.seed(memory, curvature_check=curvature_check, scale_gamma=True)
    keep = [0, 2, 4] if curvature_check else [0, 1, 2, 4]
    assert n_rejected == 5 - len(keep)
    kept, inverse = ws.export()
    assert kept.kinds == [kinds[i] for i in keep]
    torch.testing.assert_close(kept.s, s[keep], rtol=0, atol=0)
    if curvature_check:  # the negative pair cannot enter a BFGS matrix
        ref = LBFGSInverse(s[keep], y[keep], 1.0)
        torch.testing.assert_close(inverse.dense(), ref.dense(), rtol=1e-10, atol=1e-12)


def test_seed_with_too_many_good_pairs_after_rejections_and_a_single_pair():
    s, y = pairs(7, seed=1)
    y = y.clone()
    y[0] = -y[0]
    memory = LBFGSMemory(s, y)
    ws = _Workspace(5, 3, DT, torch.device("cpu"))
    assert ws.seed(memory, curvature_check=True, scale_gamma=False) == 1
    kept, inverse = ws.export()
    torch.testing.assert_close(kept.s, s[-3:], rtol=0, atol=0)
    torch.testing.assert_close(
        inverse.dense(), LBFGSInverse(s[-3:], y[-3:]).dense(), rtol=1e-10, atol=1e-12
    )
    ws = _Workspace(5, 3, DT, torch.device("cpu"))
    assert ws.seed(LBFGSMemory(s[2:3], y[2:3]), curvature_check=True, scale_gamma=False) == 0
    kept, inverse = ws.export()
    assert len(kept.kinds) == 1
    torch.testing.assert_close(inverse.matvec(y[2]), s[2], rtol=1e-10, atol=1e-12)  # secant


def test_opa_schedules():
    from shine.solvers import LBFGS

    paper = LBFGS(opa_every=3, opa_schedule="paper")
    authors = LBFGS(opa_every=3, opa_schedule="authors")
    assert [n for n in range(10) if paper._opa_due(n)] == [0, 3, 6, 9]
    # authors: 1-based k = n + 1 with k % 3 == 0 and k > 1
    assert [n for n in range(10) if authors._opa_due(n)] == [2, 5, 8]
    every_two = LBFGS(opa_every=2, opa_schedule="authors")
    assert [n for n in range(6) if every_two._opa_due(n)] == [1, 3, 5]
    every_one = LBFGS(opa_every=1, opa_schedule="authors")
    assert [n for n in range(4) if every_one._opa_due(n)] == [1, 2, 3]  # not before k = 2


def test_empty_memory():
    memory = LBFGSMemory.empty(4, dtype=torch.float32)
    assert memory.s.shape == (0, 4) and memory.s.dtype == torch.float32
    assert memory.kinds == [] and memory.gamma == 1.0 and len(memory) == 0
