"""The functional ops of nn/ops/ (docs/architecture.md), each on both of its paths: gradients by finite
differences (``gradcheck``, float64) on the memory-lean path, through its autograd Function, with
respect to the inputs that Function differentiates (it treats the rest, such as edge rotations and grid
matrices, as constants), and with respect to every input on the plain-torch path, which the
conservative forces (model/conservative.py, under ``plain_autograd()``) differentiate twice
(``gradgradcheck``)."""
import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

from fairchem_equiformerv2.nn.ops import dense, grid, scatter
from fairchem_equiformerv2.nn.ops.autograd_mode import plain_autograd
from fairchem_equiformerv2.nn.ops.grid import _GridSiLU, grid_silu
from fairchem_equiformerv2.nn.ops.linear import _SO3Linear, so3_linear
from fairchem_equiformerv2.nn.ops.scatter import _GatherPairs, _ScatterSum, gather_pairs, scatter_sum
from fairchem_equiformerv2.nn.ops.so2 import _ComplexLinear, _RadialLinear, complex_linear, radial_linear
from fairchem_equiformerv2.so3.layout import degree_of_coefficients

NUM_ATOMS, NUM_EDGES = 3, 5
SOURCE, TARGET = torch.tensor([0, 2, 1, 2, 0]), torch.tensor([1, 0, 2, 2, 1])


def double(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64)


def cases() -> dict:
    """Each op as ``(function of tensors, the tensors, how many of the first ones its autograd Function
    differentiates, that Function)``, on tiny shapes."""
    torch.manual_seed(0)
    degree = degree_of_coefficients(1)
    return {
        "linear": (dense.linear, (double(2, 3, 4), double(5, 4), double(5)), 3, dense._Linear),
        "gather_pairs": (lambda x, rotation: gather_pairs(x, SOURCE, TARGET, rotation),
                         (double(NUM_ATOMS, 4, 2), double(NUM_EDGES, 3, 4)), 1, _GatherPairs),
        "gather_pairs, no rotation": (lambda x: gather_pairs(x, SOURCE, TARGET), (double(NUM_ATOMS, 4, 2),), 1, _GatherPairs),
        "scatter_sum": (lambda src, rotation: scatter_sum(src, TARGET, NUM_ATOMS, rotation),
                        (double(NUM_EDGES, 3, 2), double(NUM_EDGES, 4, 3)), 1, _ScatterSum),
        "scatter_sum, no rotation": (lambda src: scatter_sum(src, TARGET, NUM_ATOMS), (double(NUM_EDGES, 3, 2),), 1, _ScatterSum),
        "radial_linear": (lambda x, h, rw, rb, weight, bias: radial_linear(x, (h, rw, rb), weight, bias),
                          (double(NUM_EDGES, 6), double(NUM_EDGES, 3), double(6, 3), double(6), double(4, 6), double(4)),
                          6, _RadialLinear),
        "complex_linear": (lambda x, h, rw, rb, weight: complex_linear(x, (h, rw, rb), weight),
                           (double(NUM_EDGES, 2, 6), double(NUM_EDGES, 3), double(6, 3), double(6), double(8, 6)),
                           5, _ComplexLinear),
        "complex_linear, no radial": (lambda x, weight: complex_linear(x, None, weight),
                                      (double(NUM_EDGES, 2, 6), double(8, 6)), 2, _ComplexLinear),
        "grid_silu": (grid_silu, (double(NUM_ATOMS, 4, 2), double(7, 4), double(4, 7)), 1, _GridSiLU),
        "so3_linear": (lambda x, weight, bias: so3_linear(x, weight, bias, degree),
                       (double(NUM_ATOMS, 4, 3), double(2, 2, 3), double(2)), 3, _SO3Linear),
    }


def recorded(out: torch.Tensor, function) -> bool:
    """Whether ``out`` was made by the autograd Function ``function``."""
    return type(out.grad_fn).__name__ == f"{function.__name__}Backward"


@pytest.mark.parametrize("name", [name for name in cases() if name != "linear"])  # linear: below
def test_lean_path_gradients(name, monkeypatch):
    """The Function's backward (edges and grid rows block by block, as on the CPU in training)."""
    monkeypatch.setattr(scatter, "EDGE_BLOCK_BYTES", 1)  # one edge per block
    monkeypatch.setattr(grid, "GRID_BLOCK_ROWS", 2)  # two blocks of rows
    op, inputs, differentiated, function = cases()[name]
    inputs = [t.requires_grad_(i < differentiated) for i, t in enumerate(inputs)]
    assert recorded(op(*inputs), function)
    assert gradcheck(op, inputs)


@pytest.mark.skipif(not dense.onednn_available(), reason="torch has no oneDNN here")
@pytest.mark.filterwarnings("ignore:Input #.* not a double precision")
def test_linear_lean_path_gradients(monkeypatch):
    """``linear``'s Function is oneDNN's products, which are float32 only: checked in float32, to its
    tolerances, with respect to ``x``, ``weight`` and ``bias``."""
    monkeypatch.setattr(dense, "_route", "onednn")
    torch.manual_seed(0)
    inputs = [torch.randn(*shape, requires_grad=True) for shape in ((2, 3, 4), (5, 4), (5,))]
    assert recorded(dense.linear(*inputs), dense._Linear)
    assert gradcheck(dense.linear, inputs, eps=1e-2, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("name", list(cases()))
def test_plain_path_gradients_to_second_order(name, monkeypatch):
    """Under ``plain_autograd()`` no Function is recorded (on the oneDNN route too), and autograd's
    first and second derivatives hold with respect to every input, rotations and grids included."""
    monkeypatch.setattr(dense, "_route", "onednn")
    op, inputs, _, function = cases()[name]
    inputs = [t.requires_grad_() for t in inputs]
    with plain_autograd():
        assert not recorded(op(*inputs), function)
        assert gradcheck(op, inputs)
        assert gradgradcheck(op, inputs)
