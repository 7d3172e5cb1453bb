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
and default, so a fairchem config runs by changing only the class name. Two more: ``edge_roll``
chooses how edge frames are rolled (see :mod:`.so3.frames`), and ``torch_compile`` compiles the
equivariant modules (fairchem 1.x's trainers have no compile switch of their own).
"""
from __future__ import annotations

import copy
import logging
from collections.abc import Mapping

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import check_arguments, flag, integer, integer_list, optional, real, text
from ..errors import ConfigError, ElementError, InputError
from .graph import GraphSettings, RadiusSearch, build_graph
from ..nn.attention import GraphAttention
from ..nn.block import EquiformerV2Block
from ..nn.embedding import AtomEmbedding, EdgeDegreeEmbedding
from ..nn.feed_forward import FeedForward
from ..nn.norm import NORM_TYPES, make_norm
from ..nn.ops.autograd_mode import plain_autograd
from ..nn.precision import autocast_off
from ..nn.radial import EdgeTypeEmbedding, GaussianBasis
from ..so3.frames import edge_frames
from ..so3.layout import EdgeLayout
from ..so3.rotation import EdgeRotation
from ..nn.init import init_weights

logger = logging.getLogger(__name__)

# Statistics of OC20 IS2RE 100k (max_radius 5, max_neighbors 100): fairchem's defaults.
_AVG_NUM_NODES = 77.81317
_AVG_DEGREE = 23.395238876342773

NUM_GAUSSIANS = 600  # fairchem's EquiformerV2 always expands distances in 600 Gaussians
# fairchem's EquiformerV2 never reads attn_activation / ffn_activation: SiLU on the S2 grid whatever they
# say. Other names are accepted with a warning, so that every checkpoint fairchem runs converts.
ACTIVATION_NAMES = ("scaled_silu", "silu")
EDGE_ROLLS = ("random_when_training", "random", "deterministic")

#: Type and range of each numeric and boolean argument (the string choices are checked by name below).
ARGUMENT_RULES = {
    **dict.fromkeys(
        ("use_pbc", "use_pbc_single", "regress_forces", "otf_graph", "use_atom_edge_embedding",
         "share_atom_edge_embedding", "use_m_share_rad", "use_s2_act_attn", "use_attn_renorm", "use_gate_act",
         "use_grid_mlp", "use_sep_s2_act", "enforce_max_neighbors_strictly"),
        flag,
    ),
    **dict.fromkeys(("use_energy_lin_ref", "load_energy_lin_ref", "activation_checkpoint"), optional(flag)),
    **dict.fromkeys(
        ("max_neighbors", "max_num_elements", "num_layers", "sphere_channels", "attn_hidden_channels", "num_heads",
         "attn_alpha_channels", "attn_value_channels", "ffn_hidden_channels", "num_sphere_samples", "edge_channels",
         "num_distance_basis"),
        integer(1),
    ),
    "max_radius": real(0, above=True),
    "lmax_list": optional(integer_list(1)),
    "mmax_list": optional(integer_list(0)),
    "grid_resolution": optional(integer(2)),
    **dict.fromkeys(("alpha_drop", "drop_path_rate", "proj_drop"), real(0, below=1)),
    **dict.fromkeys(("avg_num_nodes", "avg_degree"), optional(real(0, above=True))),
    **dict.fromkeys(("norm_type", "distance_function", "attn_activation", "ffn_activation", "weight_init", "edge_roll"), text),
}


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def attention_activation(use_gate_act: bool, use_sep_s2_act: bool) -> str:
    """fairchem's flags -> the attention's activation name."""
    return "gate" if use_gate_act else ("separable_s2" if use_sep_s2_act else "s2")


def ffn_activation_kind(use_gate_act: bool, use_grid_mlp: bool, use_sep_s2_act: bool) -> str:
    """fairchem's flags -> the feed-forward network's activation name."""
    if use_grid_mlp:
        return "separable_grid_mlp" if use_sep_s2_act else "grid_mlp"
    return attention_activation(use_gate_act, use_sep_s2_act)


class EquiformerV2Backbone(nn.Module):
    """EquiformerV2 (Liao, Wood, Das, Smidt, ICLR 2024).

    Forward: a fairchem batch -> ``{"node_embedding": [N, (lmax+1)**2, sphere_channels],
    "graph": GraphData, "rotation": EdgeRotation, "edge_features": [E, basis]}``.
    See fairchem's ``equiformer_v2_backbone`` for the arguments; ``edge_roll`` is one of
    ``"random_when_training"`` (default: the published random roll in training, a deterministic one
    in evaluation), ``"random"`` or ``"deterministic"``.

    The adapters set :attr:`radius_search` to their fairchem's ``radius_graph_pbc``; this class alone
    has none (it cannot build a graph).
    """

    #: fairchem's neighbour search (see :data:`.graph.RadiusSearch`), a ``staticmethod`` set by the adapters
    radius_search: RadiusSearch | None = None

    def __init__(
        self,
        use_pbc: bool = True,
        use_pbc_single: bool = False,
        regress_forces: bool = True,
        otf_graph: bool = True,
        max_neighbors: int = 500,
        max_radius: float = 5.0,
        max_num_elements: int = 90,
        num_layers: int = 12,
        sphere_channels: int = 128,
        attn_hidden_channels: int = 128,
        num_heads: int = 8,
        attn_alpha_channels: int = 32,
        attn_value_channels: int = 16,
        ffn_hidden_channels: int = 512,
        norm_type: str = "rms_norm_sh",
        lmax_list: list[int] | None = None,
        mmax_list: list[int] | None = None,
        grid_resolution: int | None = None,
        num_sphere_samples: int = 128,
        edge_channels: int = 128,
        use_atom_edge_embedding: bool = True,
        share_atom_edge_embedding: bool = False,
        use_m_share_rad: bool = False,
        distance_function: str = "gaussian",
        num_distance_basis: int = 512,
        attn_activation: str = "scaled_silu",
        use_s2_act_attn: bool = False,
        use_attn_renorm: bool = True,
        ffn_activation: str = "scaled_silu",
        use_gate_act: bool = False,
        use_grid_mlp: bool = False,
        use_sep_s2_act: bool = True,
        alpha_drop: float = 0.1,
        drop_path_rate: float = 0.05,
        proj_drop: float = 0.0,
        weight_init: str = "normal",
        enforce_max_neighbors_strictly: bool = True,
        avg_num_nodes: float | None = None,
        avg_degree: float | None = None,
        use_energy_lin_ref: bool | None = False,
        load_energy_lin_ref: bool | None = False,
        activation_checkpoint: bool | None = False,
        edge_roll: str = "random_when_training",
        torch_compile: bool | dict | None = False,
    ):
        check_arguments(locals(), ARGUMENT_RULES, type(self).__name__)
        super().__init__()
        lmax_list = [6] if lmax_list is None else list(lmax_list)
        mmax_list = [2] if mmax_list is None else list(mmax_list)
        _check(len(lmax_list) == len(mmax_list), f"lmax_list {lmax_list} and mmax_list {mmax_list} must have the same length")
        _check(
            len(lmax_list) == 1,
            f"lmax_list={lmax_list}: one resolution only (fairchem's EquiformerV2 cannot run several either: "
            "its feed-forward network assumes one); use e.g. lmax_list: [6], mmax_list: [2]",
        )
        lmax, mmax = lmax_list[0], mmax_list[0]
        _check(0 <= mmax <= lmax, f"mmax_list={mmax_list}: mmax must be between 0 and lmax ({lmax})")
        _check(distance_function == "gaussian", f"distance_function={distance_function!r}: only 'gaussian' is supported")
        _check(
            grid_resolution is None or (grid_resolution % 2 == 0 and grid_resolution >= 2 * (lmax + 1)),
            f"grid_resolution={grid_resolution}: the S2 grid needs an even number of latitudes, at least "
            f"2 (lmax + 1) = {2 * (lmax + 1)} for lmax {lmax}; or leave it out for the default",
        )
        for name, value in (("attn_activation", attn_activation), ("ffn_activation", ffn_activation)):
            if value not in ACTIVATION_NAMES:
                logger.warning(
                    "%s=%r is ignored, as in fairchem's EquiformerV2: the S2 grid's nonlinearity is SiLU", name, value
                )
        _check(not use_s2_act_attn, "use_s2_act_attn=True is not supported (fairchem refuses it too: it was never used)")
        _check(weight_init in ("normal", "uniform"), f"weight_init={weight_init!r}: must be 'normal' or 'uniform'")
        _check(
            not (use_energy_lin_ref and not load_energy_lin_ref),
            "use_energy_lin_ref=True needs load_energy_lin_ref=True (the references are parameters of the model)",
        )
        _check(
            use_atom_edge_embedding or not share_atom_edge_embedding,
            "share_atom_edge_embedding=True needs use_atom_edge_embedding=True",
        )
        _check(edge_roll in EDGE_ROLLS, f"edge_roll={edge_roll!r}: must be one of {EDGE_ROLLS}")
        _check(
            torch_compile is None or isinstance(torch_compile, (bool, Mapping)),
            f"torch_compile={torch_compile!r}: must be true, false or a mapping of torch.compile arguments "
            "(e.g. {mode: max-autotune-no-cudagraphs})",
        )
        _check(
            not (torch_compile and activation_checkpoint),
            "torch_compile with activation_checkpoint=True: torch 2.4 cannot compile a block inside "
            "torch.utils.checkpoint (AOTAutograd refuses to trace it); choose one",
        )
        _check(norm_type in NORM_TYPES, f"norm_type={norm_type!r}: must be one of {NORM_TYPES}")
        if num_distance_basis != 512:
            logger.warning(
                "num_distance_basis=%s is ignored, as in fairchem's EquiformerV2: distances always use %d Gaussians",
                num_distance_basis, NUM_GAUSSIANS,
            )

        # fairchem's names for the graph arguments (GraphModelMixin and its trainers read them)
        self.use_pbc, self.use_pbc_single, self.otf_graph = use_pbc, use_pbc_single, otf_graph
        self.regress_forces = regress_forces
        self.max_neighbors, self.max_radius, self.cutoff = max_neighbors, max_radius, max_radius
        self.enforce_max_neighbors_strictly = enforce_max_neighbors_strictly
        self.graph_settings = GraphSettings(
            use_pbc, use_pbc_single, otf_graph, max_radius, max_neighbors, enforce_max_neighbors_strictly
        )
        # hyperparameters heads read
        self.max_num_elements = max_num_elements
        self.num_layers, self.sphere_channels = num_layers, sphere_channels
        self.attn_hidden_channels, self.num_heads = attn_hidden_channels, num_heads
        self.attn_alpha_channels, self.attn_value_channels = attn_alpha_channels, attn_value_channels
        self.ffn_hidden_channels, self.norm_type = ffn_hidden_channels, norm_type
        self.lmax_list, self.mmax_list, self.grid_resolution = lmax_list, mmax_list, grid_resolution
        self.lmax, self.mmax = lmax, mmax
        self.edge_channels, self.use_m_share_rad = edge_channels, use_m_share_rad
        self.use_atom_edge_embedding, self.share_atom_edge_embedding = use_atom_edge_embedding, share_atom_edge_embedding
        self.attn_activation, self.ffn_activation = attn_activation, ffn_activation
        self.use_gate_act, self.use_grid_mlp, self.use_sep_s2_act = use_gate_act, use_grid_mlp, use_sep_s2_act
        self.use_attn_renorm, self.use_s2_act_attn = use_attn_renorm, use_s2_act_attn
        self.weight_init = weight_init
        self.avg_num_nodes = _AVG_NUM_NODES if avg_num_nodes is None else avg_num_nodes
        self.avg_degree = _AVG_DEGREE if avg_degree is None else avg_degree
        self.use_energy_lin_ref, self.load_energy_lin_ref = use_energy_lin_ref, load_energy_lin_ref
        self.activation_checkpoint = bool(activation_checkpoint)
        self.edge_roll = edge_roll
        # torch.compile arguments for the equivariant modules (heads' blocks too); None: eager
        self.compile_options = None
        if isinstance(torch_compile, Mapping):
            self.compile_options = {"dynamic": True, **torch_compile}
        elif torch_compile:
            self.compile_options = {"dynamic": True}
        self.layout = EdgeLayout(lmax, mmax)

        self.atom_embedding = AtomEmbedding(max_num_elements, sphere_channels, lmax)
        self.distance_expansion = GaussianBasis(0.0, max_radius, NUM_GAUSSIANS, 2.0)
        # [basis, hidden, hidden] of every radial MLP
        self.radial_channels = [NUM_GAUSSIANS, edge_channels, edge_channels]
        self.shared_edge_types = None
        if share_atom_edge_embedding:
            self.shared_edge_types = EdgeTypeEmbedding(max_num_elements, edge_channels)
            self.radial_channels[0] += 2 * edge_channels
        # atom-type tables inside each block unless they are shared (then they are in the basis)
        self.block_edge_types = max_num_elements if use_atom_edge_embedding and not share_atom_edge_embedding else None

        self.edge_degree_embedding = EdgeDegreeEmbedding(
            sphere_channels, lmax, self.radial_channels, self.block_edge_types, rescale_factor=self.avg_degree
        )
        self.blocks = nn.ModuleList(
            EquiformerV2Block(
                self.make_attention(sphere_channels, alpha_drop),
                self.make_feed_forward(sphere_channels),
                norm_type,
                drop_path_rate=drop_path_rate,
                proj_drop=proj_drop,
            )
            for _ in range(num_layers)
        )
        self.norm = make_norm(norm_type, lmax, sphere_channels)
        if load_energy_lin_ref:
            self.energy_lin_ref = nn.Parameter(torch.zeros(max_num_elements), requires_grad=False)

        self.apply(lambda module: init_weights(module, weight_init))
        for module in (self.edge_degree_embedding, *self.blocks):
            self.compiled(module)

    def compiled(self, module: nn.Module) -> nn.Module:
        """``module``, compiled in place (``nn.Module.compile``: its parameter names stay as they are)
        when the backbone has ``torch_compile``. The graph construction, edge frames and Wigner matrices
        stay eager."""
        if self.compile_options is not None:
            module.compile(**self.compile_options)
        return module

    # Builders the heads use too, so that a head's attention or FFN matches the backbone's.
    def make_attention(self, output_channels: int, alpha_drop: float = 0.0) -> GraphAttention:
        return GraphAttention(
            sphere_channels=self.sphere_channels,
            hidden_channels=self.attn_hidden_channels,
            num_heads=self.num_heads,
            alpha_channels=self.attn_alpha_channels,
            value_channels=self.attn_value_channels,
            output_channels=output_channels,
            layout=self.layout,
            radial_channels=self.radial_channels,
            max_num_elements=self.block_edge_types,
            activation=attention_activation(self.use_gate_act, self.use_sep_s2_act),
            use_m_share_rad=self.use_m_share_rad,
            use_attn_renorm=self.use_attn_renorm,
            alpha_drop=alpha_drop,
            grid_resolution=self.grid_resolution,
            recompute_messages=not self.activation_checkpoint,
        )

    def make_feed_forward(self, output_channels: int) -> FeedForward:
        return FeedForward(
            self.sphere_channels,
            self.ffn_hidden_channels,
            output_channels,
            self.lmax,
            activation=ffn_activation_kind(self.use_gate_act, self.use_grid_mlp, self.use_sep_s2_act),
            grid_resolution=self.grid_resolution,
        )

    def random_roll(self) -> bool:
        return self.edge_roll == "random" or (self.edge_roll == "random_when_training" and self.training)

    def _check_input(self, data) -> torch.Tensor:
        """Atomic numbers ``[N]`` (long) after checking the batch can be embedded."""
        if data.pos.shape[0] == 0:
            raise InputError("empty batch: it contains no atoms")
        atomic_numbers = data.atomic_numbers.long()
        bad = (atomic_numbers < 0) | (atomic_numbers >= self.max_num_elements)
        if bad.any():
            atom = int(bad.nonzero()[0])
            raise ElementError(
                f"atom {atom} (atomic number {int(atomic_numbers[atom])}) is outside the model's "
                f"element table: max_num_elements={self.max_num_elements} allows 0..{self.max_num_elements - 1}"
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
        _check(
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

    def forward(self, data) -> dict:
        data = self._geometry_in_model_dtype(data)
        if self.energy_gradients is not None:  # forces (and stress) as gradients of the energy
            with torch.enable_grad(), plain_autograd():
                data, inputs = self.energy_gradients.prepare(data)
                return {**self._embed(data), **inputs}
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

    def _embed(self, data) -> dict:
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
        emb = {"node_embedding": x, "graph": graph, "rotation": rotation, "edge_features": edge_features}
        if self.use_energy_lin_ref:
            emb["energy_lin_ref"] = self.energy_lin_ref  # [max_num_elements]
        return emb

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def extra_repr(self) -> str:
        return (
            f"num_layers={self.num_layers}, sphere_channels={self.sphere_channels}, lmax={self.lmax}, "
            f"mmax={self.mmax}, num_heads={self.num_heads}, norm_type={self.norm_type!r}, "
            f"max_radius={self.max_radius}, max_neighbors={self.max_neighbors}, edge_roll={self.edge_roll!r}"
            + (f", torch_compile={self.compile_options}" if self.compile_options is not None else "")
        )
