"""The kernels behind the blocks' functional ops: scatter sums, the CPU matmul route, recomputation in
backward, and the switch between memory-lean and plain autograd."""
