"""StatePacker / zeros_like_state / DEQLayer bookkeeping: the structure of a state survives."""

from __future__ import annotations

import pytest
import torch
from deq_problems import DT

from shine.backward import Shine
from shine.deq import DEQLayer, StatePacker
from shine.deq.flatten import zeros_like_state
from shine.solvers import Broyden


def test_one_dimensional_and_single_component_states_round_trip():
    z = torch.arange(4.0, dtype=DT)  # (B,): one scalar per sample
    packer = StatePacker.like(z)
    assert packer.shapes == ((),) and packer.dim == 1
    assert packer.unflatten(packer.flatten(z)).shape == (4,)
    single = [torch.randn(3, 2, dtype=DT)]  # a list of one component is a valid state
    packer = StatePacker.like(single)
    assert packer.kind == "list" and packer.dim == 2
    with pytest.raises(ValueError, match="scalar"):
        StatePacker.like(torch.tensor(1.0))
    for bad in ([], (), 3):  # an empty sequence or no sequence at all
        with pytest.raises(ValueError, match="non-empty list/tuple"):
            StatePacker.like(bad)


@pytest.mark.parametrize("container", [list, tuple])
def test_unflatten_and_zeros_keep_the_container_type(container):
    z = container([torch.randn(2, 3, dtype=DT), torch.randn(2, 1, 2, dtype=DT)])
    packer = StatePacker.like(z)
    assert packer.kind == container.__name__
    back = packer.unflatten(packer.flatten(z))
    assert type(back) is container and [t.shape for t in back] == [(2, 3), (2, 1, 2)]
    zeros = zeros_like_state(z)
    assert type(zeros) is container
    for zero, t in zip(zeros, z, strict=True):
        assert zero.shape == t.shape and zero.dtype == t.dtype and not zero.any()


def test_layer_starts_without_results_and_runs_without_any_gradient_path():
    layer = DEQLayer(lambda z, x: 0.5 * torch.tanh(z) + x, Broyden(tol=1e-12), Shine())
    assert layer.last_forward is None and layer.last_backward is None
    assert layer.last_backward_time is None
    x = torch.randn(3, 4, dtype=DT)
    out = layer(x)
    torch.testing.assert_close(out, 0.5 * torch.tanh(out) + x, atol=1e-10, rtol=0)
    # f constant in z, no parameter, no input gradient: the output has no graph to hook
    const = DEQLayer(lambda z, x: 2 * x, Broyden(tol=1e-12), Shine())(x)
    assert not const.requires_grad
    torch.testing.assert_close(const, 2 * x)
    pair = (x, x[:, :2].clone())  # tuple input, default z0: zeros shaped like x
    z = DEQLayer(
        lambda z, x: tuple(0.5 * torch.tanh(a) + b for a, b in zip(z, x, strict=True)),
        Broyden(tol=1e-12),
        Shine(),
    )(pair)
    assert type(z) is tuple and [t.shape for t in z] == [(3, 4), (3, 2)]
