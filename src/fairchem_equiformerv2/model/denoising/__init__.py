"""Training-time denoising objectives on the backbone: DeNS (:mod:`.dens`, :mod:`.dens_objective`) and
Noisy Nodes (:mod:`.noisy_nodes`)."""
