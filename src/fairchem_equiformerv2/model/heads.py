"""Output heads on the EquiformerV2 backbone: torch modules, made fairchem ``HeadInterface`` classes by the
adapters (:mod:`.fairchem1`, :mod:`.fairchem2`).

Each returns ``{output_name: tensor}``; with fairchem's ``hydra`` model the trainer finds it under
``outputs.<target>.property``. Heads build their blocks with the backbone's own builders, so they
share its hyperparameters. A head reads ``data.batch``, ``data.natoms`` and ``data.atomic_numbers``,
which fairchem 1.x's ``Batch`` and 2.x's ``AtomicData`` both hold.

* :class:`EnergyHead`: a feed-forward network to one invariant per atom, summed per structure and
  divided by ``avg_num_nodes`` (``reduce="sum"``), or averaged (``reduce="mean"``); plus per-element
  linear references when the backbone has ``use_energy_lin_ref``.
* :class:`ForceHead`: a graph attention to one vector per atom (direct forces).
* :class:`StressHead`: a symmetric rank-2 tensor per structure (stress) from edge-direction outer
  products, either whole (9 components) or as isotropic (l = 0) and anisotropic (l = 2) parts.
"""
from __future__ import annotations

import torch
from e3nn import o3
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..errors import ConfigError
from ..nn.norm import make_norm
from ..nn.precision import at_least_float32
from ..nn.ops.scatter import gather_pairs, segment_mean, segment_sum
from ..nn.init import init_weights
from .backbone import BackboneOutput


def sum_per_structure(values: torch.Tensor, batch: torch.Tensor, num_structures: int) -> torch.Tensor:
    """``values [N, ...]`` -> ``[num_structures, ...]``, summed in float32 at least."""
    values = at_least_float32(values)
    return values.new_zeros(num_structures, *values.shape[1:]).index_add_(0, batch, values)


class EnergyHead(nn.Module):
    """Energy per structure ``[B]``."""

    def __init__(self, backbone, output_name: str = "energy", reduce: str = "sum"):
        super().__init__()
        if reduce not in ("sum", "mean"):
            raise ConfigError(f"EnergyHead: reduce={reduce!r}: must be 'sum' or 'mean'")
        self.output_name, self.reduce = output_name, reduce
        self.avg_num_nodes = backbone.config.avg_num_nodes
        self.energy_block = backbone.compiled(backbone.make_feed_forward(1))
        self.apply(lambda m: init_weights(m, backbone.config.weight_init))

    def forward(self, data, emb: BackboneOutput) -> dict:
        node_energy = self.energy_block(emb.node_embedding)[:, 0, 0]  # [N]
        num_structures = len(data.natoms)
        natoms = data.natoms.clamp_min(1)  # a structure without atoms: energy 0 (fairchem's mean: 0 / 0)
        energy = sum_per_structure(node_energy, data.batch, num_structures)
        energy = energy / self.avg_num_nodes if self.reduce == "sum" else energy / natoms
        if emb.energy_lin_ref is not None:  # [num_elements], a backbone parameter as in fairchem's checkpoints
            reference = sum_per_structure(emb.energy_lin_ref[data.atomic_numbers.long()], data.batch, num_structures)
            energy = energy + (reference if self.reduce == "sum" else reference / natoms)
        return {self.output_name: energy}  # [B]

    def extra_repr(self) -> str:
        return f"output_name={self.output_name!r}, reduce={self.reduce!r}, avg_num_nodes={self.avg_num_nodes}"


class ForceHead(nn.Module):
    """Direct forces ``[N, 3]``: the ``l = 1`` output of a graph attention (``D^1(R) = R``, so
    these coefficients are Cartesian x, y, z)."""

    def __init__(self, backbone, output_name: str = "forces"):
        super().__init__()
        self.output_name = output_name
        self.activation_checkpoint = bool(backbone.config.activation_checkpoint)
        self.force_block = backbone.compiled(backbone.make_attention(1, alpha_drop=0.0))
        self.apply(lambda m: init_weights(m, backbone.config.weight_init))

    def forward(self, data, emb: BackboneOutput) -> dict:
        return {self.output_name: self.vector(self.force_block, emb)}  # [N, 3]

    def vector(self, block: nn.Module, emb: BackboneOutput) -> torch.Tensor:
        """The ``l = 1`` output ``[N, 3]`` of a graph attention ``block`` on the backbone's ``emb``."""
        graph = emb.graph
        args = (emb.node_embedding, graph.atomic_numbers_full, emb.edge_features, graph.edge_index, emb.rotation)
        out = checkpoint(block, *args, use_reentrant=False) if self.activation_checkpoint else block(*args)
        return at_least_float32(out[:, 1:4, 0]).contiguous()

    def extra_repr(self) -> str:
        return f"output_name={self.output_name!r}"


def _mlp(channels: int, num_layers: int) -> nn.Sequential:
    """``num_layers`` linear layers ``channels -> ... -> 1`` with SiLU between."""
    layers: list[nn.Module] = []
    for _ in range(num_layers - 1):
        layers += [nn.Linear(channels, channels), nn.SiLU()]
    return nn.Sequential(*layers, nn.Linear(channels, 1))


class Rank2Block(nn.Module):
    """All 9 components: ``features [E, C]`` times the edge outer product ``r r^T`` -> MLP ->
    mean over each atom's edges -> per structure. Returns ``[B, 9]``."""

    def __init__(self, emb_size: int, num_layers: int = 2, edge_level: bool = False, extensive: bool = False):
        super().__init__()
        self.edge_level, self.extensive = edge_level, extensive
        self.r2tensor_MLP = _mlp(emb_size, num_layers)

    def forward(self, edge_vec, features, target, batch, num_atoms, num_structures):
        outer = (edge_vec[:, :, None] * edge_vec[:, None, :]).view(-1, 1, 9)
        edge_outer = features[:, :, None] * outer  # [E, C, 9]
        if self.edge_level:
            per_edge = self.r2tensor_MLP(edge_outer.transpose(1, 2)).squeeze(-1)  # [E, 9]
            per_atom = segment_mean(per_edge, target, num_atoms)
        else:
            per_atom = segment_mean(edge_outer, target, num_atoms)  # [N, C, 9]
            per_atom = self.r2tensor_MLP(per_atom.transpose(1, 2)).squeeze(-1)  # [N, 9]
        return (segment_sum if self.extensive else segment_mean)(per_atom, batch, num_structures)


class Rank2DecompositionBlock(nn.Module):
    """Isotropic and anisotropic parts: an invariant MLP of ``features [E, C]`` (l = 0) and an MLP
    of ``Y^2(r) features`` (l = 2, the 5 components of the traceless symmetric part). Returns
    ``([B], [B, 5])``."""

    def __init__(self, emb_size: int, num_layers: int = 2, edge_level: bool = False, extensive: bool = False):
        super().__init__()
        self.edge_level, self.extensive = edge_level, extensive
        self.scalar_MLP = _mlp(emb_size, num_layers)
        self.irrep2_MLP = _mlp(emb_size, num_layers)

    def forward(self, edge_vec, features, target, batch, num_atoms, num_structures):
        harmonics = o3.spherical_harmonics(2, edge_vec, normalize=True).detach()  # [E, 5]
        edge_irrep2 = harmonics[:, :, None] * features[:, None, :]  # [E, 5, C]
        if self.edge_level:
            scalar = segment_mean(self.scalar_MLP(features), target, num_atoms)
            irrep2 = segment_mean(self.irrep2_MLP(edge_irrep2), target, num_atoms)
        else:
            scalar = self.scalar_MLP(segment_mean(features, target, num_atoms))  # [N, 1]
            irrep2 = self.irrep2_MLP(segment_mean(edge_irrep2, target, num_atoms))  # [N, 5, 1]
        reduce = segment_sum if self.extensive else segment_mean
        return reduce(scalar.view(-1), batch, num_structures), reduce(irrep2.view(-1, 5), batch, num_structures)


class StressHead(nn.Module):
    """Symmetric rank-2 tensor per structure (stress), as in fairchem's OMat24 EquiformerV2 models.

    Edge features are the target atom's node features (or source and target concatenated)
    contracted with the edge's spherical harmonics (normalised like node features), then
    layer-normalised. ``decompose=True`` returns ``{name}_isotropic [B, 1]`` and
    ``{name}_anisotropic [B, 5]`` (fairchem's ``decomposition`` targets); otherwise ``{name}
    [3B, 3]``. Arguments as fairchem's ``rank2_symmetric_head``.
    """

    def __init__(
        self,
        backbone,
        output_name: str = "stress",
        decompose: bool = False,
        edge_level_mlp: bool = False,
        num_mlp_layers: int = 2,
        use_source_target_embedding: bool = False,
        extensive: bool = False,
        avg_num_nodes: float = 1.0,
        default_norm_type: str = "layer_norm_sh",
    ):
        super().__init__()
        self.output_name, self.decompose = output_name, decompose
        self.use_source_target_embedding, self.avg_num_nodes = use_source_target_embedding, avg_num_nodes
        self.lmax = backbone.config.lmax
        self.sphharm_norm = make_norm(backbone.config.norm_type, self.lmax, 1)  # default_norm_type: fairchem's, unused
        channels = backbone.config.sphere_channels * (2 if use_source_target_embedding else 1)
        self.xedge_layer_norm = nn.LayerNorm(channels)
        block = Rank2DecompositionBlock if decompose else Rank2Block
        self.block = block(channels, num_layers=num_mlp_layers, edge_level=edge_level_mlp, extensive=extensive)
        self.block.apply(lambda m: init_weights(m, "uniform"))

    def forward(self, data, emb: BackboneOutput) -> dict:
        x, graph = emb.node_embedding, emb.graph
        source, target = graph.edge_index
        edge_vec = graph.edge_distance_vec
        harmonics = o3.spherical_harmonics(list(range(self.lmax + 1)), edge_vec, normalize=False).detach()
        harmonics = self.sphharm_norm(harmonics[:, :, None]).squeeze(-1)  # [E, F]
        x_edge = gather_pairs(x, source, target) if self.use_source_target_embedding else x.index_select(0, target)
        features = self.xedge_layer_norm(torch.einsum("efc,ef->ec", x_edge, harmonics))  # [E, C]

        sizes = (x.shape[0], len(data.natoms))
        if self.decompose:
            isotropic, anisotropic = self.block(edge_vec, features, target, data.batch, *sizes)
            if self.block.extensive:
                isotropic, anisotropic = isotropic / self.avg_num_nodes, anisotropic / self.avg_num_nodes
            return {f"{self.output_name}_isotropic": isotropic.unsqueeze(1), f"{self.output_name}_anisotropic": anisotropic}
        return {self.output_name: self.block(edge_vec, features, target, data.batch, *sizes).reshape(-1, 3)}

    def extra_repr(self) -> str:
        return f"output_name={self.output_name!r}, decompose={self.decompose}, use_source_target_embedding={self.use_source_target_embedding}"
