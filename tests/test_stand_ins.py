"""The GPU benchmarks' stand-ins for torch_scatter (benchmarks/stand_ins) agree with the real package."""
import importlib.util
from pathlib import Path

import pytest
import torch
import torch_scatter

STAND_INS = Path(__file__).resolve().parents[1] / "benchmarks" / "stand_ins"


def load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def stand_in():
    module = load("stand_in_torch_scatter", STAND_INS / "torch_scatter" / "__init__.py")
    module.utils = load("stand_in_torch_scatter_utils", STAND_INS / "torch_scatter" / "utils.py")
    return module


def test_scatter_and_segments_match_torch_scatter(stand_in):
    g = torch.Generator().manual_seed(0)
    src = torch.randn(30, 4, 3, generator=g)
    index = torch.randint(0, 7, (30,), generator=g)
    for reduce in ("sum", "mean", "max"):
        expected = torch_scatter.scatter(src, index, dim=0, dim_size=9, reduce=reduce)
        torch.testing.assert_close(stand_in.scatter(src, index, dim=0, dim_size=9, reduce=reduce), expected)
    ordered = index.sort().values
    torch.testing.assert_close(stand_in.segment_coo(src, ordered, dim_size=8), torch_scatter.segment_coo(src, ordered, dim_size=8))
    indptr = torch.tensor([0, 3, 3, 10, 30])
    torch.testing.assert_close(stand_in.segment_csr(src, indptr), torch_scatter.segment_csr(src, indptr))


def test_broadcast_matches_torch_scatter(stand_in):
    from torch_scatter.utils import broadcast

    other = torch.zeros(5, 4, 3)
    for src, dim in ((torch.arange(4.0), 1), (torch.arange(5.0), -3), (torch.ones(5, 4), 0)):
        torch.testing.assert_close(stand_in.utils.broadcast(src, other, dim), broadcast(src, other, dim))


def test_sparse_tensor_refuses():
    module = load("stand_in_torch_sparse", STAND_INS / "torch_sparse" / "__init__.py")
    with pytest.raises(NotImplementedError, match="stand-in"):
        module.SparseTensor()
