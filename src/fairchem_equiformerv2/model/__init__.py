"""The model on torch alone: configuration rules, the graph, the backbone, its heads, the conservative
head and the denoising variants (:mod:`.denoising`). Imports :mod:`..nn` and :mod:`..so3`, no fairchem."""
