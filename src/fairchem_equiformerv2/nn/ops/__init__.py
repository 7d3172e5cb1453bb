"""The kernels behind the blocks, each one functional op: dense products, scatter sums, the SO(2)
maps, the grid SiLU, the SO(3) linear map; recomputation in backward, and the switch between
memory-lean and plain autograd."""
