import torch


def broadcast(src: torch.Tensor, other: torch.Tensor, dim: int) -> torch.Tensor:
    """``src`` expanded to ``other``'s shape: a 1-D ``src`` runs along ``dim``, a longer one fills the
    leading dimensions."""
    dim = dim % other.dim()
    if src.dim() == 1:
        src = src.view([-1 if d == dim else 1 for d in range(other.dim())])
    else:
        src = src.view(*src.shape, *[1] * (other.dim() - src.dim()))
    return src.expand_as(other)
