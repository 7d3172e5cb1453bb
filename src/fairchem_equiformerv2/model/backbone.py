"""The EquiformerV2 backbone's computation, on torch alone.

structure batch -> graph (:mod:`.graph`: periodic along each structure's periodic directions) -> edge
frames and their Wigner-D -> atom embedding + edge-degree embedding -> ``num_layers`` blocks -> final
norm -> node features.

This module imports nothing from fairchem. fairchem sees the backbone through an adapter, a subclass
that adds fairchem's ``BackboneInterface`` and its neighbour search (:attr:`radius_search`):
:mod:`.fairchem1` for fairchem-core 1.x, :mod:`.fairchem2` for 2.x. Both read the same batch fields
(``pos``, ``cell``, ``pbc``, ``atomic_numbers``, ``natoms``, ``batch``) and hold the same weights, so
one checkpoint's tensors load in either.

The constructor takes every argument of fairchem's ``equiformer_v2_backbone`` with the same meaning
and default, so a fairchem config runs by changing only the class name; they are checked and kept in
:class:`.config.BackboneConfig` (``backbone.config``), which the heads read. Two more: ``edge_roll``
chooses how edge frames are rolled (see :mod:`.so3.frames`), and ``torch_compile`` compiles the
equivariant modules (fairchem 1.x's trainers have no compile switch of their own).
"""
from __future__ import annotations

import copy
import dataclasses

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import BackboneConfig, NUM_GAUSSIANS, require
from ..errors import ElementError, InputError
from .graph import Graph, GraphSettings, RadiusSearch, build_graph
from ..nn.attention import GraphAttention
from ..nn.block import EquiformerV2Block
from ..nn.embedding import AtomEmbedding, EdgeDegreeEmbedding
from ..nn.feed_forward import FeedForward
from ..nn.norm import make_norm
from ..nn.ops.autograd_mode import plain_autograd
from ..nn.precision import autocast_off
from ..nn.radial import EdgeTypeEmbedding, GaussianBasis
from ..so3.frames import edge_frames
from ..so3.layout import EdgeLayout
from ..so3.rotation import EdgeRotation
from ..nn.init import init_weights


@dataclasses.dataclass
class BackboneOutput:
    """What the backbone gives its heads (``N`` atoms, ``E`` edges, ``B`` structures, ``F = (lmax+1)**2``
    coefficients, ``C = sphere_channels``); the optional fields are ``None`` unless the variant sets them.

    node_embedding: ``[N, F, C]`` node features after the final norm.
    graph: the radius graph (:class:`.graph.Graph`: ``edge_index [2, E]``, ``edge_distance_vec [E, 3]``, ...).
    rotation: the edges' frames and Wigner-D matrices (:class:`.so3.rotation.EdgeRotation`).
    edge_features: ``[E, basis]`` the distance expansion (with the shared atom-type tables when on).
    energy_lin_ref: ``[max_num_elements]`` per-element energy references (``use_energy_lin_ref``).
    gradient_positions, gradient_strain, gradient_cell: ``[N, 3]``, ``[B, 3, 3]``, ``[B, 3, 3]``, the leaves
        a :class:`.conservative.ConservativeHead` differentiates the energy by (strain and cell with stress).
    denoising: :class:`.denoising.dens.DenoisingState`, from a :class:`.denoising.dens.DeNSBackbone`.
    noisy_nodes: the target ``[N, 3]`` and coefficient (:class:`.denoising.base.AuxiliaryTarget`), from a
        :class:`.denoising.noisy_nodes.NoisyNodesBackbone`.
    """

    node_embedding: torch.Tensor
    graph: Graph
    rotation: EdgeRotation
    edge_features: torch.Tensor
    energy_lin_ref: torch.Tensor | None = None
    gradient_positions: torch.Tensor | None = None
    gradient_strain: torch.Tensor | None = None
    gradient_cell: torch.Tensor | None = None
    denoising: object | None = None
    noisy_nodes: object | None = None

    def __getitem__(self, name: str):
        """``output["node_embedding"]``: dict-style reads, as of scripts written for the former dict
        (fairchem itself only passes the output to the heads)."""
        return getattr(self, name)


class EquiformerV2Backbone(nn.Module):
    """EquiformerV2 (Liao, Wood, Das, Smidt, ICLR 2024).

    Forward: a fairchem batch -> :class:`BackboneOutput` (``node_embedding [N, (lmax+1)**2,
    sphere_channels]``, the graph, the edges' rotations, ``edge_features [E, basis]``).
    The keyword arguments are :class:`.config.BackboneConfig`'s (fairchem's ``equiformer_v2_backbone``'s),
    kept as :attr:`config`; ``edge_roll`` is one of
    ``"random_when_training"`` (default: the published random roll in training, a deterministic one
    in evaluation), ``"random"`` or ``"deterministic"``.

    The adapters set :attr:`radius_search` to their fairchem's ``radius_graph_pbc``; this class alone
    has none (it cannot build a graph).
    """

    #: fairchem's neighbour search (see :data:`.graph.RadiusSearch`), a ``staticmethod`` set by the adapters
    radius_search: RadiusSearch | None = None

    def __init__(self, **arguments):
        config = BackboneConfig(**arguments, owner=type(self).__name__)  # checks every argument first
        super().__init__()
        self.config = config
        # What fairchem reads of a backbone (GraphModelMixin, its trainers), by fairchem's names
        self.use_pbc, self.use_pbc_single, self.otf_graph = config.use_pbc, config.use_pbc_single, config.otf_graph
        self.regress_forces, self.enforce_max_neighbors_strictly = config.regress_forces, config.enforce_max_neighbors_strictly
        self.max_neighbors, self.max_radius, self.cutoff = config.max_neighbors, config.max_radius, config.max_radius
        self.activation_checkpoint = bool(config.activation_checkpoint)
        # Switches changed after the build: the 2.x adapter compiles for inference, scripts set the roll
        self.compile_options, self.edge_roll = config.compile_options, config.edge_roll
        self.use_energy_lin_ref = config.use_energy_lin_ref
        self.graph_settings = GraphSettings(
            config.use_pbc, config.use_pbc_single, config.otf_graph, config.max_radius, config.max_neighbors,
            config.enforce_max_neighbors_strictly,
        )
        self.layout = EdgeLayout(config.lmax, config.mmax)
        channels, lmax = config.sphere_channels, config.lmax

        self.atom_embedding = AtomEmbedding(config.max_num_elements, channels, lmax)
        self.distance_expansion = GaussianBasis(0.0, config.max_radius, NUM_GAUSSIANS, 2.0)
        self.shared_edge_types = None
        if config.share_atom_edge_embedding:
            self.shared_edge_types = EdgeTypeEmbedding(config.max_num_elements, config.edge_channels)
        self.edge_degree_embedding = EdgeDegreeEmbedding(
            channels, lmax, config.radial_channels, config.block_edge_types, rescale_factor=config.avg_degree
        )
        self.blocks = nn.ModuleList(
            EquiformerV2Block(
                self.make_attention(channels, config.alpha_drop),
                self.make_feed_forward(channels),
                config.norm_type,
                drop_path_rate=config.drop_path_rate,
                proj_drop=config.proj_drop,
            )
            for _ in range(config.num_layers)
        )
        self.norm = make_norm(config.norm_type, lmax, channels)
        if config.load_energy_lin_ref:
            self.energy_lin_ref = nn.Parameter(torch.zeros(config.max_num_elements), requires_grad=False)

        self.apply(lambda module: init_weights(module, config.weight_init))
        for module in (self.edge_degree_embedding, *self.blocks):
            self.compiled(module)

    def __getattr__(self, name: str):
        """Modules and parameters, else the config's fields and properties read through
        (``backbone.lmax`` is ``backbone.config.lmax``) for scripts written before the config."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            config = self.__dict__.get("config")
            if config is None or not hasattr(config, name):
                raise
            return getattr(config, name)

    def compiled(self, module: nn.Module) -> nn.Module:
        """``module``, compiled in place (``nn.Module.compile``: its parameter names stay as they are)
        when the backbone has ``torch_compile``. The graph construction, edge frames and Wigner matrices
        stay eager."""
        if self.compile_options is not None:
            module.compile(**self.compile_options)
        return module

    # Builders the heads use too, so that a head's attention or FFN matches the backbone's.
    def make_attention(self, output_channels: int, alpha_drop: float = 0.0) -> GraphAttention:
        config = self.config
        return GraphAttention(
            sphere_channels=config.sphere_channels,
            hidden_channels=config.attn_hidden_channels,
            num_heads=config.num_heads,
            alpha_channels=config.attn_alpha_channels,
            value_channels=config.attn_value_channels,
            output_channels=output_channels,
            layout=self.layout,
            radial_channels=config.radial_channels,
            max_num_elements=config.block_edge_types,
            activation=config.attention_activation,
            use_m_share_rad=config.use_m_share_rad,
            use_attn_renorm=config.use_attn_renorm,
            alpha_drop=alpha_drop,
            grid_resolution=config.grid_resolution,
            recompute_messages=not self.activation_checkpoint,
        )

    def make_feed_forward(self, output_channels: int) -> FeedForward:
        config = self.config
        return FeedForward(
            config.sphere_channels,
            config.ffn_hidden_channels,
            output_channels,
            config.lmax,
            activation=config.feed_forward_activation,
            grid_resolution=config.grid_resolution,
        )

    def random_roll(self) -> bool:
        return self.edge_roll == "random" or (self.edge_roll == "random_when_training" and self.training)

    def _check_input(self, data) -> torch.Tensor:
        """Atomic numbers ``[N]`` (long) after checking the batch can be embedded."""
        if data.pos.shape[0] == 0:
            raise InputError("empty batch: it contains no atoms")
        atomic_numbers = data.atomic_numbers.long()
        num_elements = self.config.max_num_elements
        bad = (atomic_numbers < 0) | (atomic_numbers >= num_elements)
        if bad.any():
            atom = int(bad.nonzero()[0])
            raise ElementError(
                f"atom {atom} (atomic number {int(atomic_numbers[atom])}) is outside the model's "
                f"element table: max_num_elements={num_elements} allows 0..{num_elements - 1}"
            )
        if not torch.isfinite(data.pos).all():
            atom = int((~torch.isfinite(data.pos)).any(dim=1).nonzero()[0])
            raise InputError(f"atom {atom} has a non-finite position {data.pos[atom].tolist()}")
        return atomic_numbers

    def _check_cpu_compile_autocast(self) -> None:
        """Refuse what torch 2.4's CPU compiler gets wrong: under bf16 autocast, inductor's CPU kernels
        for our autograd Functions come out in the wrong dtype (``RuntimeError: mat1 and mat2 must have
        the same dtype`` in a training step). fairchem's ``amp`` is CUDA-only, so its trainers never get
        here. (``aot_eager``, let through, fails likewise in a training step's backward; inference
        without gradients runs with either.)"""
        require(
            self.compile_options is None
            or not torch.is_autocast_enabled("cpu")
            or self.compile_options.get("backend", "inductor") != "inductor"
            or torch.torch_version.TorchVersion(torch.__version__) >= (2, 5),
            f"torch_compile under CPU autocast: torch {torch.__version__}'s CPU compiler builds kernels of the "
            "wrong dtype for it; on the CPU run eager (torch_compile: false) or without autocast",
        )

    def _search(self) -> RadiusSearch:
        if self.radius_search is None:
            raise TypeError(
                f"{type(self).__name__} has no neighbour search: build the backbone through an adapter "
                "(fairchem_equiformerv2.EquiformerV2Backbone picks the one for the installed fairchem)"
            )
        return self.radius_search

    #: set by a head that differentiates the energy (:class:`.conservative.ConservativeHead`): then the
    #: forward makes positions (and a strain) require grad before the graph, with differentiable frames
    energy_gradients = None

    def forward(self, data) -> BackboneOutput:
        data = self._geometry_in_model_dtype(data)
        if self.energy_gradients is not None:  # forces (and stress) as gradients of the energy
            with torch.enable_grad(), plain_autograd():
                data, leaves = self.energy_gradients.prepare(data)
                return dataclasses.replace(self._embed(data), **leaves)
        return self._embed(data)

    def _geometry_in_model_dtype(self, data):
        """``data``, or a shallow copy whose ``pos`` and ``cell`` are cast to the parameters' dtype
        (float64 positions into a float32 model, as ASE gives them): outputs come in the model's dtype.
        ``.to`` is differentiable, so a gradient taken by the caller reaches the original positions."""
        dtype = next(self.parameters()).dtype
        cell = getattr(data, "cell", None)
        if data.pos.dtype == dtype and (cell is None or cell.dtype == dtype):
            return data
        data = copy.copy(data)  # the caller's batch keeps its tensors
        data.pos = data.pos.to(dtype)
        if cell is not None:
            data.cell = cell.to(dtype)
        return data

    def embed_atoms(self, data, atomic_numbers: torch.Tensor) -> torch.Tensor:
        """Node features ``[N, (lmax+1)**2, C]`` before the edge-degree embedding: the atom embedding in
        ``l = 0``. A subclass adds its per-atom inputs here (:class:`.dens.DeNSBackbone`: the force
        encoding)."""
        return self.atom_embedding(atomic_numbers)

    def _embed(self, data) -> BackboneOutput:
        atomic_numbers = self._check_input(data)
        if data.pos.device.type == "cpu":
            self._check_cpu_compile_autocast()
        # Geometry in the input's precision, also under autocast: bf16 periodic-image offsets alone
        # would move atoms by ~0.05 A.
        with autocast_off(data.pos):
            graph = build_graph(data, self.graph_settings, self._search())
            differentiable = self.energy_gradients is not None
            frames = edge_frames(graph.edge_distance_vec, random=self.random_roll(), differentiable=differentiable)
            rotation = EdgeRotation.from_frames(frames, self.layout, differentiable=differentiable)
            edge_features = self.distance_expansion(graph.edge_distance)  # [E, basis]
        edge_index = graph.edge_index
        if self.shared_edge_types is not None:
            edge_features = self.shared_edge_types(edge_features, atomic_numbers, edge_index)

        x = self.embed_atoms(data, atomic_numbers)  # [N, F, C]
        x = x + self.edge_degree_embedding(atomic_numbers, edge_features, edge_index, rotation)
        num_graphs = len(data.natoms)
        for block in self.blocks:
            args = (x, atomic_numbers, edge_features, edge_index, rotation, data.batch, num_graphs)
            x = checkpoint(block, *args, use_reentrant=False) if self.activation_checkpoint else block(*args)
        x = self.norm(x)
        reference = self.energy_lin_ref if self.use_energy_lin_ref else None  # [max_num_elements]
        return BackboneOutput(x, graph, rotation, edge_features, energy_lin_ref=reference)

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def extra_repr(self) -> str:
        config = self.config
        return (
            f"num_layers={config.num_layers}, sphere_channels={config.sphere_channels}, lmax={config.lmax}, "
            f"mmax={config.mmax}, num_heads={config.num_heads}, norm_type={config.norm_type!r}, "
            f"max_radius={config.max_radius}, max_neighbors={config.max_neighbors}, edge_roll={self.edge_roll!r}"
            + (f", torch_compile={self.compile_options}" if self.compile_options is not None else "")
        )
