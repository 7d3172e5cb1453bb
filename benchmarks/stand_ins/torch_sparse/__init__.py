"""Stand-in for torch_sparse where it has no build (see ../README.md): fairchem imports SparseTensor."""


class SparseTensor:
    def __init__(self, *args, **kwargs):
        raise NotImplementedError("torch_sparse stand-in: SparseTensor is not available here")
