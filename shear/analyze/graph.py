"""The structure graph: coupled groups of parameters that are removed together.

A *group* is a set of prunable *units* (a head, a KV group, an MLP channel, a hidden channel,
a layer). Removing unit ``u`` of a group removes, from every member parameter, the slice
``index_select(dim, member.units[u])``. Every member holds the same number of units, so a plan
only has to say which unit numbers to keep; the members say where those units live.

Example (Llama, hidden 64, 4 query heads / 2 KV heads, head_dim 16), KV-group kind, layer 0::

    Group(name="layers.0.kv_group", kind="kv_group", layer=0, num_units=2, members=[
        Member("model.layers.0.self_attn.q_proj.weight", dim=0, units=[[0..31], [32..63]]),
        Member("model.layers.0.self_attn.k_proj.weight", dim=0, units=[[0..15], [16..31]]),
        Member("model.layers.0.self_attn.v_proj.weight", dim=0, units=[[0..15], [16..31]]),
        Member("model.layers.0.self_attn.o_proj.weight", dim=1, units=[[0..31], [32..63]]),
    ])

Layer-kind groups (``layer``, ``attn_sublayer``, ``mlp_sublayer``) have ``num_units == 1`` and
name the module that goes in ``module``; their members list the parameters that go with it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

#: group kinds, by what a unit is.
HEAD_KINDS = ("head", "kv_group", "query_head")  #: attention units: MHA heads, KV groups, query heads in groups
WIDTH_KINDS = ("head", "kv_group", "query_head", "mlp_channel", "hidden")
DEPTH_KINDS = ("layer", "attn_sublayer", "mlp_sublayer")
KINDS = WIDTH_KINDS + DEPTH_KINDS


@dataclass
class Member:
    """One parameter of a group.

    Attributes:
        param: fully qualified parameter name, as in ``model.named_parameters()``.
        dim: the dimension the units index (0 = output rows of a Linear weight, 1 = input columns).
        units: LongTensor ``[num_units, width]``; row ``u`` holds the indices of unit ``u`` along
            ``dim``. For layer kinds it is ``[1, 0]`` (the whole parameter goes).
        role: what the indexed dimension is, for scoring: ``"out"`` (rows produced by the unit,
            e.g. q/k/v/gate/up rows), ``"in"`` (inputs consumed by the unit, e.g. o_proj/down_proj
            columns: the activation criteria look here), ``"norm"`` (a norm's weight/bias),
            ``"embed"`` (embedding columns), ``"bias"``, or ``"whole"`` (layer kinds).
    """

    param: str
    dim: int
    units: torch.Tensor
    role: str = "out"

    def indices(self, units: torch.Tensor | list[int]) -> torch.Tensor:
        """Flat, sorted indices along ``dim`` covered by the given unit numbers."""
        u = torch.as_tensor(units, dtype=torch.long)
        return self.units[u].reshape(-1).sort().values

    @property
    def width(self) -> int:
        return int(self.units.shape[1])


@dataclass
class Group:
    """A set of coupled units removed together. See the module docstring."""

    name: str
    kind: str
    num_units: int
    members: list[Member]
    layer: int | None = None
    module: str | None = None  # layer kinds: the module path removed (e.g. "model.layers.3.mlp")
    params_per_unit: int = 0
    macs_per_unit: int = 0  # multiply-accumulates per token removed with one unit
    meta: dict = field(default_factory=dict)  # family details (head_dim, heads per KV group, ...)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"group {self.name!r}: unknown kind {self.kind!r}; expected one of {KINDS}")
        for m in self.members:
            if m.units.shape[0] != self.num_units:
                raise ValueError(
                    f"group {self.name!r}: member {m.param} has {m.units.shape[0]} units, "
                    f"expected {self.num_units}"
                )

    @property
    def num_params(self) -> int:
        return self.params_per_unit * self.num_units


@dataclass
class StructureGraph:
    """All groups of one model, plus totals used for shares and budgets."""

    family: str
    groups: list[Group]
    total_params: int
    total_macs: int  # multiply-accumulates per token of the whole model (matmuls only)
    meta: dict = field(default_factory=dict)

    def by_kind(self, kind: str) -> list[Group]:
        return [g for g in self.groups if g.kind == kind]

    def __getitem__(self, name: str) -> Group:
        for g in self.groups:
            if g.name == name:
                return g
        raise KeyError(f"no group named {name!r}; groups: {[g.name for g in self.groups][:8]} ...")


@dataclass
class PrunePlan:
    """What to remove: unit numbers per group name (width kinds), and whole groups (depth kinds).

    ``remove["layers.3.mlp_channel"] = [5, 17, ...]`` removes those MLP channels of layer 3;
    ``remove["layers.5.layer"] = [0]`` removes decoder block 5. Unit numbers refer to the model
    *before* this plan is applied (slicing renumbers).
    """

    remove: dict[str, list[int]] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)  # how it was made: estimator, target, ratios

    def is_empty(self) -> bool:
        return not any(len(v) for v in self.remove.values())
