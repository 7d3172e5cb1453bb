"""The backbone's configuration (:class:`BackboneConfig`) and the type and range checks of configuration
fields, with messages that name the field and its value.

A config is YAML typed by hand: ``num_layers: "2"`` or ``max_radius: 0`` should stop at construction
with the field's name, not as a ``TypeError`` or ``ZeroDivisionError`` deep inside the first forward
pass. Each rule is a function of the value that returns what is wrong with it, or ``None``.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import ClassVar

from ..errors import ConfigError
from ..nn.norm import NORM_TYPES

logger = logging.getLogger(__name__)

Rule = Callable[[object], "str | None"]


def _is_integer(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def integer(minimum: int) -> Rule:
    """A whole number ``>= minimum``."""

    def rule(value):
        if not _is_integer(value):
            return f"must be a whole number >= {minimum}, not a {type(value).__name__}"
        return None if value >= minimum else f"must be >= {minimum}"

    return rule


def real(minimum: float, *, above: bool = False, below: float | None = None, maximum: float | None = None) -> Rule:
    """A finite number ``>= minimum`` (``> minimum`` with ``above``; ``< below`` and ``<= maximum`` when given)."""
    bounds = f"{'>' if above else '>='} {minimum}" + (f" and < {below}" if below is not None else "")
    bounds += f" and <= {maximum}" if maximum is not None else ""

    def rule(value):
        if not _is_real(value):
            return f"must be a number {bounds}, not a {type(value).__name__}"
        value = float(value)
        ok = math.isfinite(value) and (value > minimum if above else value >= minimum)
        ok = ok and (below is None or value < below) and (maximum is None or value <= maximum)
        return None if ok else f"must be a number {bounds}"

    return rule


def flag(value) -> str | None:
    """true or false (0 and 1 too, as fairchem reads them by truth)."""
    if isinstance(value, bool) or (_is_integer(value) and value in (0, 1)):
        return None
    return f"must be true or false, not a {type(value).__name__}"


def boolean(value) -> str | None:
    """true or false only (YAML's booleans): a string such as ``"no"`` or ``"false"`` is true to Python."""
    return None if isinstance(value, bool) else f"must be true or false, not a {type(value).__name__}"


def text(value) -> str | None:
    return None if isinstance(value, str) else f"must be a string, not a {type(value).__name__}"


def one_of(*choices: str) -> Rule:
    """One of the strings ``choices``."""
    names = ", ".join(repr(choice) for choice in choices)
    return lambda value: None if isinstance(value, str) and value in choices else f"must be one of {names}"


def optional(rule: Rule) -> Rule:
    """``rule``, or ``None`` (null in YAML: the default)."""
    return lambda value: None if value is None else rule(value)


def integer_list(minimum: int) -> Rule:
    """A non-empty list of whole numbers ``>= minimum`` (any sequence: hydra passes a ``ListConfig``)."""
    element = integer(minimum)

    def rule(value):
        if isinstance(value, str) or not isinstance(value, Sequence) or not value:
            return f"must be a non-empty list of whole numbers, not {type(value).__name__}"
        problems = [element(v) for v in value]
        return next((f"entry {v!r} {p}" for v, p in zip(value, problems) if p), None)

    return rule


def check_arguments(values: Mapping[str, object], rules: Mapping[str, Rule], owner: str) -> None:
    """Raise :class:`ConfigError` for the first field of ``values`` that breaks its rule:
    ``"<owner>: <field>=<value>: <what is wrong>"``."""
    for name, rule in rules.items():
        if name in values:
            problem = rule(values[name])
            if problem:
                raise ConfigError(f"{owner}: {name}={values[name]!r}: {problem}")


def check_block(values: object, rules: Mapping[str, Rule], block: str) -> dict:
    """The settings of a nested config block (``noisy_nodes: {...}``) as a dict, after checking them:
    :class:`ConfigError` when ``values`` is not a mapping (``None`` is an empty block), names a field
    without a rule (an unknown field) or a field breaks its rule: ``"<block>.<field>=<value>: <what is
    wrong>"``."""
    if values is None:
        return {}
    if not isinstance(values, Mapping):
        raise ConfigError(f"{block}={values!r}: must be a mapping of settings (field: value)")
    for name, value in values.items():
        problem = rules[name](value) if name in rules else f"unknown field (the fields: {', '.join(rules)})"
        if problem:
            raise ConfigError(f"{block}.{name}={value!r}: {problem}")
    return dict(values)


class ConfigBlock:
    """Mix-in of a frozen dataclass that is a nested config block (``noisy_nodes: {...}``): each field
    checked with :attr:`rules` at construction (:class:`.ConfigError` ``"<block>.<field>=<value>: ..."``)."""

    block: ClassVar[str]
    rules: ClassVar[Mapping[str, Rule]]

    def __post_init__(self):
        check_block(dataclasses.asdict(self), self.rules, self.block)

    @classmethod
    def from_config(cls, values):
        """The block's config from ``values`` (a mapping; ``None`` = the defaults); :class:`.ConfigError`
        names a bad or unknown field and its value."""
        return cls(**check_block(values, cls.rules, cls.block))


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


def require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


@dataclasses.dataclass(frozen=True)
class BackboneConfig:
    """The backbone's hyperparameters, checked when built: every argument of fairchem's
    ``equiformer_v2_backbone`` with its meaning and default, plus ``edge_roll`` (how edge frames are
    rolled, one of :data:`EDGE_ROLLS`) and ``torch_compile`` (true, or a mapping of ``torch.compile``
    arguments, compiles the equivariant modules).

    A bad value raises :class:`ConfigError` ``"<owner>: <field>=<value>: <what is wrong>"``
    (:data:`ARGUMENT_RULES`) or a message naming the fields that disagree. ``None`` in ``lmax_list``,
    ``mmax_list``, ``avg_num_nodes`` and ``avg_degree`` becomes fairchem's default (``[6]``, ``[2]``
    and OC20's statistics); ``owner`` is the class named in messages.
    """

    use_pbc: bool = True
    use_pbc_single: bool = False
    regress_forces: bool = True
    otf_graph: bool = True
    max_neighbors: int = 500
    max_radius: float = 5.0
    max_num_elements: int = 90
    num_layers: int = 12
    sphere_channels: int = 128
    attn_hidden_channels: int = 128
    num_heads: int = 8
    attn_alpha_channels: int = 32
    attn_value_channels: int = 16
    ffn_hidden_channels: int = 512
    norm_type: str = "rms_norm_sh"
    lmax_list: tuple[int, ...] | None = None
    mmax_list: tuple[int, ...] | None = None
    grid_resolution: int | None = None
    num_sphere_samples: int = 128
    edge_channels: int = 128
    use_atom_edge_embedding: bool = True
    share_atom_edge_embedding: bool = False
    use_m_share_rad: bool = False
    distance_function: str = "gaussian"
    num_distance_basis: int = 512
    attn_activation: str = "scaled_silu"
    use_s2_act_attn: bool = False
    use_attn_renorm: bool = True
    ffn_activation: str = "scaled_silu"
    use_gate_act: bool = False
    use_grid_mlp: bool = False
    use_sep_s2_act: bool = True
    alpha_drop: float = 0.1
    drop_path_rate: float = 0.05
    proj_drop: float = 0.0
    weight_init: str = "normal"
    enforce_max_neighbors_strictly: bool = True
    avg_num_nodes: float | None = None
    avg_degree: float | None = None
    use_energy_lin_ref: bool | None = False
    load_energy_lin_ref: bool | None = False
    activation_checkpoint: bool | None = False
    edge_roll: str = "random_when_training"
    torch_compile: bool | Mapping | None = False
    owner: dataclasses.InitVar[str] = "EquiformerV2Backbone"

    def __post_init__(self, owner: str) -> None:
        check_arguments(vars(self), ARGUMENT_RULES, owner)
        lmax_list = [6] if self.lmax_list is None else list(self.lmax_list)
        mmax_list = [2] if self.mmax_list is None else list(self.mmax_list)
        require(len(lmax_list) == len(mmax_list), f"lmax_list {lmax_list} and mmax_list {mmax_list} must have the same length")
        require(
            len(lmax_list) == 1,
            f"lmax_list={lmax_list}: one resolution only (fairchem's EquiformerV2 cannot run several either: "
            "its feed-forward network assumes one); use e.g. lmax_list: [6], mmax_list: [2]",
        )
        lmax, mmax, grid = lmax_list[0], mmax_list[0], self.grid_resolution
        require(0 <= mmax <= lmax, f"mmax_list={mmax_list}: mmax must be between 0 and lmax ({lmax})")
        require(self.distance_function == "gaussian", f"distance_function={self.distance_function!r}: only 'gaussian' is supported")
        require(
            grid is None or (grid % 2 == 0 and grid >= 2 * (lmax + 1)),
            f"grid_resolution={grid}: the S2 grid needs an even number of latitudes, at least "
            f"2 (lmax + 1) = {2 * (lmax + 1)} for lmax {lmax}; or leave it out for the default",
        )
        for name, value in (("attn_activation", self.attn_activation), ("ffn_activation", self.ffn_activation)):
            if value not in ACTIVATION_NAMES:
                logger.warning("%s=%r is ignored, as in fairchem's EquiformerV2: the S2 grid's nonlinearity is SiLU", name, value)
        require(not self.use_s2_act_attn, "use_s2_act_attn=True is not supported (fairchem refuses it too: it was never used)")
        require(self.weight_init in ("normal", "uniform"), f"weight_init={self.weight_init!r}: must be 'normal' or 'uniform'")
        require(not (self.use_energy_lin_ref and not self.load_energy_lin_ref),
                "use_energy_lin_ref=True needs load_energy_lin_ref=True (the references are parameters of the model)")
        require(self.use_atom_edge_embedding or not self.share_atom_edge_embedding,
                "share_atom_edge_embedding=True needs use_atom_edge_embedding=True")
        require(self.edge_roll in EDGE_ROLLS, f"edge_roll={self.edge_roll!r}: must be one of {EDGE_ROLLS}")
        require(
            self.torch_compile is None or isinstance(self.torch_compile, (bool, Mapping)),
            f"torch_compile={self.torch_compile!r}: must be true, false or a mapping of torch.compile arguments "
            "(e.g. {mode: max-autotune-no-cudagraphs})",
        )
        require(
            not (self.torch_compile and self.activation_checkpoint),
            "torch_compile with activation_checkpoint=True: torch 2.4 cannot compile a block inside "
            "torch.utils.checkpoint (AOTAutograd refuses to trace it); choose one",
        )
        require(self.norm_type in NORM_TYPES, f"norm_type={self.norm_type!r}: must be one of {NORM_TYPES}")
        if self.num_distance_basis != 512:
            logger.warning(
                "num_distance_basis=%s is ignored, as in fairchem's EquiformerV2: distances always use %d Gaussians",
                self.num_distance_basis, NUM_GAUSSIANS,
            )
        defaults = {"lmax_list": tuple(lmax_list), "mmax_list": tuple(mmax_list),
                    "avg_num_nodes": _AVG_NUM_NODES if self.avg_num_nodes is None else self.avg_num_nodes,
                    "avg_degree": _AVG_DEGREE if self.avg_degree is None else self.avg_degree}
        for name, value in defaults.items():
            object.__setattr__(self, name, value)

    @property
    def lmax(self) -> int:
        return self.lmax_list[0]

    @property
    def mmax(self) -> int:
        return self.mmax_list[0]

    @property
    def compile_options(self) -> dict | None:
        """``torch.compile`` arguments for the equivariant modules (heads' blocks too); ``None``: eager."""
        if isinstance(self.torch_compile, Mapping):
            return {"dynamic": True, **self.torch_compile}
        return {"dynamic": True} if self.torch_compile else None

    @property
    def attention_activation(self) -> str:
        """fairchem's flags -> the attention's activation name."""
        return "gate" if self.use_gate_act else ("separable_s2" if self.use_sep_s2_act else "s2")

    @property
    def feed_forward_activation(self) -> str:
        """fairchem's flags -> the feed-forward network's activation name."""
        if self.use_grid_mlp:
            return "separable_grid_mlp" if self.use_sep_s2_act else "grid_mlp"
        return self.attention_activation

    @property
    def radial_channels(self) -> list[int]:
        """``[basis, hidden, hidden]`` of every radial MLP (the shared atom-type tables widen the basis)."""
        basis = NUM_GAUSSIANS + (2 * self.edge_channels if self.share_atom_edge_embedding else 0)
        return [basis, self.edge_channels, self.edge_channels]

    @property
    def block_edge_types(self) -> int | None:
        """The element count of the atom-type tables inside each block; ``None`` when there are none
        (off, or shared in the basis)."""
        return self.max_num_elements if self.use_atom_edge_embedding and not self.share_atom_edge_embedding else None
