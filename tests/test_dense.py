"""Dense products through oneDNN (nn/ops/dense.py) and the route runtime.configure() picks: the same numbers and gradients as torch's own ops,
torch's ops where oneDNN does not apply, and the model's products really going through it."""
import os
import subprocess
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from structures import default_structures, to_batch

from fairchem_equiformerv2 import runtime
from fairchem_equiformerv2.nn.ops import grid as activation
from fairchem_equiformerv2.nn.ops import dense

pytestmark = pytest.mark.skipif(not dense.onednn_available(), reason="torch has no oneDNN here")


@pytest.fixture(autouse=True)
def onednn_route(monkeypatch):
    """These tests are of the oneDNN route: take it, whatever this machine's measurement chose (made
    first, so that a model built through fairchem, which makes it, does not change the route)."""
    runtime.configure()
    monkeypatch.setattr(dense, "_route", "onednn")


def operand_layouts():
    """(a, b) pairs for ``a @ b``: contiguous, transposed views, a strided slice, a 3D ``a``, no rows."""
    torch.manual_seed(0)
    x = torch.randn(70, 2, 40)
    return {
        "contiguous": (torch.randn(70, 40), torch.randn(40, 30)),
        "transposed": (torch.randn(40, 70).T, torch.randn(30, 40).T),
        "slice": (x[:, 1], x[:30, 0].T),  # strides oneDNN's fast kernels refuse: copied first
        "3d": (torch.randn(5, 14, 40), torch.randn(40, 30)),
        "no rows": (torch.randn(0, 40), torch.randn(40, 30)),
    }


@pytest.mark.parametrize("layout", list(operand_layouts()))
def test_mm_matches_torch(layout):
    a, b = operand_layouts()[layout]
    torch.testing.assert_close(dense.mm(a, b), a @ b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bias", [True, False])
def test_linear_values_and_gradients_match_torch(bias):
    torch.manual_seed(0)
    layer = dense.Linear(24, 16, bias=bias)
    x = torch.randn(3, 50, 24, requires_grad=True)
    reference = torch.nn.Linear(24, 16, bias=bias)
    reference.load_state_dict(layer.state_dict())
    x_ref = x.detach().clone().requires_grad_()
    grad = torch.randn(3, 50, 16)
    out, out_ref = layer(x), reference(x_ref)
    assert out.grad_fn is not None and "_Linear" in type(out.grad_fn).__name__  # the oneDNN path
    out.backward(grad)
    out_ref.backward(grad)
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    for p, p_ref in zip(layer.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-5, atol=1e-5)


def test_torch_ops_where_onednn_does_not_apply():
    a, b = torch.randn(8, 6, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64)
    assert not dense.uses_onednn(a, b)
    assert torch.equal(dense.mm(a, b), a @ b)  # float64: torch's own op, bit for bit
    a32, b32 = a.float(), b.float()
    assert dense.uses_onednn(a32, b32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not dense.uses_onednn(a32, b32)
        assert dense.mm(a32, b32).dtype == torch.bfloat16  # autocast's matmul, as torch's @ gives
        assert dense.linear(a32, b32.T).dtype == torch.bfloat16


def test_the_environment_variable_chooses_and_a_wrong_value_is_named():
    code = ("from fairchem_equiformerv2 import runtime; from fairchem_equiformerv2.nn.ops import dense; "
            "r = runtime.configure().matmul; print(r.route, dense.onednn_route(), r)")
    for choice, expected in (("torch", "torch False"), ("onednn", "onednn True")):
        env = {**os.environ, runtime.CPU_MATMUL_ENV: choice}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.startswith(expected) and f"{runtime.CPU_MATMUL_ENV}={choice}" in out.stdout
    env[runtime.CPU_MATMUL_ENV] = "mkl"
    bad = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and f"{runtime.CPU_MATMUL_ENV}='mkl'" in bad.stderr and "onednn" in bad.stderr


def test_auto_route_is_measured_and_follows_the_faster_route(monkeypatch):
    """``auto`` times both routes; the choice follows the medians with oneDNN's margin."""
    route = runtime._measure_route(rows=64, inner=32, cols=16, rounds=3)
    assert route.route in ("onednn", "torch") and route.onednn_s > 0 and route.torch_s > 0
    assert (route.route == "onednn") == (route.onednn_s <= (1 - runtime.ONEDNN_MARGIN) * route.torch_s)
    assert "ms per probe product" in str(route)
    for onednn_s, torch_s, expected in ((1.0, 2.0, "onednn"), (1.0, 1.02, "torch"), (2.0, 1.0, "torch")):
        fake = iter([onednn_s, torch_s] * 4)
        monkeypatch.setattr(runtime.statistics, "median", lambda times: next(fake))
        assert runtime._measure_route(rows=8, inner=8, cols=8, rounds=1).route == expected


def test_both_grid_layouts_agree(monkeypatch):
    """The S2 activation's grid step, values and gradient, in oneDNN's ``[B C, P]`` layout and in the
    batched ``[B, P, C]`` one used elsewhere (GPU, bf16)."""
    torch.manual_seed(0)
    x, grad = torch.randn(75, 9, 6), torch.randn(75, 9, 6)  # 75 rows: two full blocks and a part
    to_grid, from_grid = torch.randn(40, 9), torch.randn(9, 40)
    results = []
    for layout in (activation._ChannelsByPoints, activation._PointsByChannels):
        monkeypatch.setattr(activation, "_block_layout", lambda x, layout=layout: layout)
        results.append((activation.grid_silu(x, to_grid, from_grid), activation.grid_silu_backward(grad, x, to_grid, from_grid)))
    expected = from_grid @ torch.nn.functional.silu(to_grid @ x)
    for got in results:
        torch.testing.assert_close(got[0], expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-5, atol=1e-5)


def test_model_products_go_through_onednn_and_are_all_counted(monkeypatch):
    """A training step's matrix products: most of them by oneDNN, and with ``FLOP_FORMULAS`` the same
    total as torch's own ops give (the counter sees every product)."""
    from fairchem.core.models.base import HydraModel

    torch.manual_seed(0)
    model = HydraModel(
        backbone={"model": "fairchem_equiformerv2.EquiformerV2Backbone", "num_layers": 2, "sphere_channels": 16,
                  "attn_hidden_channels": 8, "num_heads": 2, "attn_alpha_channels": 4, "attn_value_channels": 4,
                  "ffn_hidden_channels": 16, "edge_channels": 8, "lmax_list": [3], "mmax_list": [2],
                  "max_radius": 5.0, "max_neighbors": 20},
        heads={"energy": {"module": "fairchem_equiformerv2.EnergyHead"}, "forces": {"module": "fairchem_equiformerv2.ForceHead"}},
    )
    batch = to_batch(default_structures())

    def counted():
        counter = FlopCounterMode(display=False, custom_mapping=dense.FLOP_FORMULAS)
        with counter:
            out = model(batch)
            (out["energy"]["energy"].sum() + out["forces"]["forces"].pow(2).sum()).backward()
        model.zero_grad(set_to_none=True)
        return counter.get_flop_counts()["Global"]

    counted()  # the first forward also builds constants once (a few small products more)
    with_onednn = counted()
    onednn_flops = with_onednn[torch.ops.mkldnn._linear_pointwise]
    assert onednn_flops > 0.5 * sum(with_onednn.values())
    monkeypatch.setattr(dense, "_route", "torch")
    with_torch = counted()
    assert torch.ops.mkldnn._linear_pointwise not in with_torch
    assert sum(with_onednn.values()) == sum(with_torch.values())
