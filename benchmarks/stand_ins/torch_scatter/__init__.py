"""Stand-in for torch_scatter where it has no build (see ../README.md): the functions fairchem imports."""
import torch
from torch_geometric.utils import scatter as _scatter


def scatter(src, index, dim=-1, out=None, dim_size=None, reduce="sum"):
    if out is not None:
        raise NotImplementedError("torch_scatter stand-in: scatter(out=...)")
    return _scatter(src, index, dim=dim, dim_size=dim_size, reduce=reduce)


def segment_coo(src, index, out=None, dim_size=None, reduce="sum"):
    return scatter(src, index, dim=index.dim() - 1, out=out, dim_size=dim_size, reduce=reduce)


def segment_csr(src, indptr, out=None, reduce="sum"):
    counts = indptr[1:] - indptr[:-1]
    index = torch.repeat_interleave(torch.arange(counts.numel(), device=src.device), counts)
    return scatter(src[: index.numel()], index, dim=0, out=out, dim_size=counts.numel(), reduce=reduce)
