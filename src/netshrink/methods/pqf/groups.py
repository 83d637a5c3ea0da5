"""Coupled channel groups of a network, found from its torch.fx graph
(docs/methods/pqf.md#permutation-groups).

A *group* is a set of channels that one permutation may reorder without changing the
function: every layer that writes them (conv / linear output rows, with the BatchNorms
after them), every layer that passes them through (BatchNorm, depthwise convs, pointwise
activations, pooling, padding of spatial dims) and every layer that reads them (conv /
linear input columns). Residual additions and squeeze-excitation products make their
operands one group (one per residual stream, so skips are never broken); concatenations
and channel padding (ResNet option-A shortcuts) join groups segment by segment, splitting
a group where only part of it is concatenated or padded.

How: each traced value carries its channel layout as a list of segments (space, length).
A writer creates a fresh space; pass-through ops keep the layout; `cat` concatenates
layouts; `add` / `mul` record that two layouts must be equal. The equalities are then
unified (splitting spaces at segment boundaries as needed) with union-find. Anything the
analysis does not understand (an unknown op, the model's input or output, a module called
twice, a grouped conv, a flatten over spatial positions, a layer whose weight is tied to
another layer's) *blocks* the spaces it touches: those channels keep their order.

A model that torch.fx cannot trace as a whole (a Hugging Face transformer: keyword-only
wrappers, tuple arguments, data-dependent branches) is analysed part by part
(`parts.analyse_parts`): each child module with at least two weight layers is traced on its
own, and where that fails too, its children are, recursively. A traced part's inputs and
outputs are blocked like a model's, so only channels inside it (e.g. a Llama MLP's
intermediate channels: gate and up projections' rows, down projection's columns) are
grouped, and permuting them leaves the part's function, hence the model's, unchanged. A
model where no part can be traced gets no groups at all.
"""

from __future__ import annotations

import logging
import operator
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn

logger = logging.getLogger(__name__)

Seg = tuple[int, int | None]  # (space id, length)
Layout = list[Seg]

_POINTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.Hardswish, nn.Hardsigmoid, nn.SiLU, nn.Sigmoid, nn.GELU, nn.Tanh,
    nn.LeakyReLU, nn.ELU, nn.Mish, nn.Softplus, nn.Identity, nn.Dropout, nn.Dropout2d,
    nn.AlphaDropout, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d,
    nn.AvgPool3d, nn.ZeroPad2d, nn.ConstantPad2d, nn.ReflectionPad2d, nn.ReplicationPad2d,
    nn.Upsample,
)
_ADAPTIVE_POOLS = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
                   nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
_POINTWISE_FUNCTIONS = {
    F.relu, F.relu6, F.hardswish, F.hardsigmoid, F.silu, F.sigmoid, F.gelu, F.tanh,
    F.leaky_relu, F.elu, F.dropout, F.dropout2d, torch.relu, torch.sigmoid, torch.tanh,
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.interpolate,
}
_POINTWISE_METHODS = {"relu", "sigmoid", "tanh", "contiguous", "clone", "relu_", "sigmoid_",
                      "float", "to"}
_BINARY = {operator.add, operator.iadd, operator.sub, operator.mul, operator.imul,
           torch.add, torch.sub, torch.mul}
_FLATTENS = {torch.flatten}
_SHAPE_METHODS = {"view", "reshape", "flatten", "squeeze"}


@dataclass
class Member:
    """One layer's share of a group: `role` is 'writer' (output rows), 'reader' (input
    columns), 'norm' (BatchNorm vectors) or 'depthwise' (rows of a depthwise conv, which
    are also its input channels); channels [offset, offset + length) of that axis."""

    role: str
    name: str
    module: nn.Module
    offset: int


@dataclass
class Group:
    """Channels that one permutation reorders everywhere at once."""

    size: int
    members: list[Member] = field(default_factory=list)

    def readers(self) -> list[Member]:
        return [m for m in self.members if m.role == "reader"]

    def describe(self) -> str:
        roles = {r: sum(m.role == r for m in self.members)
                 for r in ("writer", "reader", "norm", "depthwise")}
        first = next((m.name for m in self.members if m.role == "writer"), "?")
        return (f"{self.size} channels from {first}: " +
                ", ".join(f"{v} {k}s" for k, v in roles.items() if v))


@dataclass
class Analysis:
    """Groups found, and why channels were blocked (empty when nothing was).

    traced: groups come from a trace (of the whole model, or of some of its parts);
    reason: why the whole model could not be traced ("" when it was); parts: the submodules
    traced one by one when it could not (empty when the whole model was traced)."""

    groups: list[Group]
    blocked: list[str]
    traced: bool
    reason: str = ""
    parts: list[str] = field(default_factory=list)


class _Tracer(fx.Tracer):
    """Keeps convs, linears and norms (subclasses too: same-padding convs) as leaves."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._BatchNorm)):
            return True
        return super().is_leaf_module(m, qualname)


@dataclass
class _Value:
    layout: Layout | None  # None: not a channel tensor we understand
    flat: bool = False  # (N, C): channels on the last axis
    spatial1: bool = False  # (N, C, 1, 1): flattening keeps the channels


class _Unifier:
    """Union-find over channel spaces with splitting at segment boundaries."""

    def __init__(self) -> None:
        self.length: dict[int, int | None] = {}
        self.parent: dict[int, int] = {}
        self.children: dict[int, list[int]] = {}
        self.members: dict[int, list[int]] = {}
        self.blocked: set[int] = set()

    def new(self, length: int | None) -> int:
        sid = len(self.length)
        self.length[sid] = length
        self.parent[sid] = sid
        self.members[sid] = [sid]
        return sid

    def find(self, s: int) -> int:
        while self.parent[s] != s:
            self.parent[s] = self.parent[self.parent[s]]
            s = self.parent[s]
        return s

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra
            self.members[ra] += self.members.pop(rb)

    def leaves(self, layout: Layout) -> list[int]:
        out: list[int] = []
        for sid, _ in layout:
            stack = [sid]
            while stack:
                s = stack.pop()
                if s in self.children:
                    stack.extend(reversed(self.children[s]))
                else:
                    out.append(s)
        return out

    def split_class(self, s: int, at: int) -> None:
        """Split every space in s's class at position `at` (they all share the length)."""
        firsts, seconds = [], []
        for m in list(self.members[self.find(s)]):
            a, b = self.new(at), self.new(self.length[m] - at)
            self.children[m] = [a, b]
            if m in self.blocked:
                self.blocked.update((a, b))
            firsts.append(a)
            seconds.append(b)
        for group in (firsts, seconds):
            for x in group[1:]:
                self.union(group[0], x)

    def unify(self, equalities: list[tuple[Layout, Layout]]) -> None:
        changed = True
        while changed:
            changed = False
            for a, b in equalities:
                la, lb = self.leaves(a), self.leaves(b)
                lens_a = [self.length[s] for s in la]
                lens_b = [self.length[s] for s in lb]
                if None in lens_a or None in lens_b or sum(lens_a) != sum(lens_b):
                    self.blocked.update(la + lb)
                    continue
                i = j = 0
                while i < len(la) and j < len(lb):
                    na, nb = self.length[la[i]], self.length[lb[j]]
                    if na == nb:
                        self.union(la[i], lb[j])
                        i, j = i + 1, j + 1
                    else:
                        if na > nb:
                            self.split_class(la[i], nb)
                        else:
                            self.split_class(lb[j], na)
                        changed = True
                        break
                if changed:
                    break

    def blocked_roots(self) -> set[int]:
        leaves = self.leaves([(s, None) for s in self.blocked])
        return {self.find(s) for s in leaves}


def analyse(model: nn.Module) -> Analysis:
    """Trace `model` and return its coupled channel groups (see the module docstring)."""
    try:
        graph = _Tracer().trace(model)
    except Exception as e:  # noqa: BLE001 (any tracing failure means: no permutation)
        reason = _failure(e)
        logger.info("permutation: the model cannot be traced with torch.fx (%s); tracing "
                    "its parts", reason)
        from .parts import analyse_parts  # it builds on this module's walker
        return analyse_parts(model, reason)
    return _Walker(model).run(graph)


def _failure(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def _parameter_owners(model: nn.Module) -> dict[int, int]:
    """How many (module, attribute) places hold each parameter, by id (tied weights: 2+)."""
    owners: Counter[int] = Counter()
    for _, module in model.named_modules(remove_duplicate=False):
        for p in module.parameters(recurse=False):
            owners[id(p)] += 1
    return owners


class _Walker:
    """Walks one traced graph. prefix: the traced module's qualified name plus ".", which
    members and reasons are named with; owners: `_parameter_owners` of the whole model (a
    member whose weight is tied elsewhere blocks its channels)."""

    def __init__(self, model: nn.Module, prefix: str = "",
                 owners: dict[int, int] | None = None) -> None:
        self.model = model
        self.prefix = prefix
        self.owners = _parameter_owners(model) if owners is None else owners
        self.u = _Unifier()
        self.values: dict[fx.Node, _Value] = {}
        self.equal: list[tuple[Layout, Layout]] = []
        self.items: list[tuple[str, str, nn.Module, Layout]] = []
        self.reasons: list[str] = []
        self.calls: dict[str, int] = {}

    # -- helpers ---------------------------------------------------------------------
    def fresh(self, length: int | None, blocked: bool = False) -> Layout:
        sid = self.u.new(length)
        if blocked:
            self.u.blocked.add(sid)
        return [(sid, length)]

    def block(self, node: fx.Node, why: str) -> None:
        """Block every channel layout among the node's inputs."""
        hit = False
        for arg in node.all_input_nodes:
            v = self.values.get(arg)
            if v is not None and v.layout is not None:
                self.u.blocked.update(s for s, _ in v.layout)
                hit = True
        if hit:
            self.reasons.append(f"{self.prefix}{node.name}: {why}")

    @staticmethod
    def width(layout: Layout) -> int | None:
        lens = [n for _, n in layout]
        return None if None in lens else sum(lens)  # type: ignore[arg-type]

    def arg(self, node: fx.Node, i: int = 0) -> _Value:
        a = node.args[i] if len(node.args) > i else None
        return self.values.get(a, _Value(None)) if isinstance(a, fx.Node) else _Value(None)

    # -- the walk --------------------------------------------------------------------
    def run(self, graph: fx.Graph) -> Analysis:
        for node in graph.nodes:
            self.values[node] = self.visit(node)
        for name, count in self.calls.items():
            if count > 1:  # a shared module: permuting it for one call breaks the other
                for _role, n, _, layout in self.items:
                    if n == name:
                        self.u.blocked.update(s for s, _ in layout)
                self.reasons.append(f"{name}: called {count} times")
        tied = sorted({n for _role, n, m, _ in self.items if any(
            self.owners.get(id(p), 1) > 1 for p in m.parameters(recurse=False))})
        for name in tied:  # permuting it would change the other holder of its weight
            for _role, n, _, layout in self.items:
                if n == name:
                    self.u.blocked.update(s for s, _ in layout)
            self.reasons.append(f"{name}: weight tied with another module")
        self.u.unify(self.equal)
        return self.collect()

    def visit(self, node: fx.Node) -> _Value:
        if node.op == "placeholder":
            return _Value(self.fresh(None, blocked=True))
        if node.op == "output":
            self.block(node, "model output")
            return _Value(None)
        if node.op == "get_attr":
            return _Value(None)
        if node.op == "call_module":
            return self.visit_module(node, self.model.get_submodule(str(node.target)))
        if node.op == "call_function":
            return self.visit_function(node)
        if node.op == "call_method":
            return self.visit_method(node)
        self.block(node, f"unknown node {node.op}")
        return _Value(None)

    def visit_module(self, node: fx.Node, m: nn.Module) -> _Value:
        name = self.prefix + str(node.target)
        x = self.arg(node)
        if any(True for _ in m.parameters(recurse=False)):
            self.calls[name] = self.calls.get(name, 0) + 1
        if isinstance(m, nn.modules.conv._ConvNd) and not m.transposed and len(node.args) == 1:
            known = x.layout is not None and not x.flat and self.width(x.layout) == m.in_channels
            if m.groups == 1:
                if known:
                    self.items.append(("reader", name, m, x.layout))
                else:  # e.g. the stem reading the model's input: its outputs stay free
                    self.block(node, "conv input not understood (e.g. the model input)")
                out = self.fresh(m.out_channels)
                self.items.append(("writer", name, m, out))
                return _Value(out)
            if not known:
                self.block(node, "grouped conv input not understood")
                return _Value(self.fresh(m.out_channels, blocked=True))
            if m.groups == m.in_channels == m.out_channels:
                self.items.append(("depthwise", name, m, x.layout))
                return _Value(x.layout)
            self.block(node, f"grouped conv (groups={m.groups})")
            return _Value(self.fresh(m.out_channels, blocked=True))
        if isinstance(m, nn.Linear) and len(node.args) == 1:
            if x.layout is None or not x.flat or self.width(x.layout) != m.in_features:
                self.block(node, "linear input not understood")
            else:
                self.items.append(("reader", name, m, x.layout))
            out = self.fresh(m.out_features)
            self.items.append(("writer", name, m, out))
            return _Value(out, flat=True)
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and x.layout is not None:
            if self.width(x.layout) != m.num_features:
                self.block(node, "norm width mismatch")
                return _Value(None)
            self.items.append(("norm", name, m, x.layout))
            return x
        if isinstance(m, _POINTWISE_MODULES) and len(node.args) == 1:
            return x
        if isinstance(m, nn.Flatten) and m.start_dim == 1:
            return self.flatten(node, x)
        if isinstance(m, _ADAPTIVE_POOLS) and len(node.args) == 1:
            size = m.output_size
            one = all(s == 1 for s in (size if isinstance(size, tuple) else (size,)))
            return _Value(x.layout, x.flat, x.spatial1 or one)
        self.block(node, f"module {type(m).__name__} not understood")
        return _Value(None)

    def visit_function(self, node: fx.Node) -> _Value:
        fn = node.target
        x = self.arg(node)
        if fn in _BINARY:
            vals = [self.values[a] for a in node.args if isinstance(a, fx.Node)]
            layouts = [v.layout for v in vals if v.layout is not None]
            if len(vals) != len(layouts) and layouts:
                self.block(node, "binary op with an unknown operand")
                return _Value(None)
            for other in layouts[1:]:
                self.equal.append((layouts[0], other))
            if not vals:
                return _Value(None)
            return _Value(layouts[0] if layouts else None, vals[0].flat,
                          all(v.spatial1 for v in vals))
        if fn in _POINTWISE_FUNCTIONS:
            return x
        if fn in (F.adaptive_avg_pool2d, F.adaptive_max_pool2d):
            size = node.args[1] if len(node.args) > 1 else node.kwargs.get("output_size")
            one = size == 1 or (isinstance(size, (tuple, list)) and all(s == 1 for s in size))
            return _Value(x.layout, x.flat, x.spatial1 or one)
        if fn in _FLATTENS:
            return self.flatten(node, x)
        if fn is F.pad:
            return self.pad(node, x)
        if fn in (torch.cat, torch.concat):
            return self.cat(node)
        if fn is operator.getitem:
            return self.getitem(node, x)
        if fn is torch.mean:
            return self.mean(node, x)
        self.block(node, f"function {getattr(fn, '__name__', fn)} not understood")
        return _Value(None)

    def visit_method(self, node: fx.Node) -> _Value:
        name = str(node.target)
        x = self.arg(node)
        if name in ("size", "dim"):
            return _Value(None)
        if name in _POINTWISE_METHODS:
            return x
        if name in _SHAPE_METHODS:
            return self.flatten(node, x)
        if name == "mean":
            return self.mean(node, x)
        self.block(node, f"method .{name}() not understood")
        return _Value(None)

    # -- shape-changing ops ----------------------------------------------------------
    def flatten(self, node: fx.Node, x: _Value) -> _Value:
        if x.layout is not None and (x.spatial1 or x.flat):
            return _Value(x.layout, flat=True)
        self.block(node, "flatten over spatial positions")
        return _Value(None)

    def mean(self, node: fx.Node, x: _Value) -> _Value:
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        keep = node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False)
        dims = tuple(dims) if isinstance(dims, (list, tuple)) else (dims,)
        if x.layout is not None and not x.flat and set(dims) in ({2, 3}, {-1, -2}):
            return _Value(x.layout, flat=not keep, spatial1=bool(keep))
        self.block(node, "mean over channels")
        return _Value(None)

    def pad(self, node: fx.Node, x: _Value) -> _Value:
        pads = node.args[1] if len(node.args) > 1 else node.kwargs.get("pad")
        mode = node.kwargs.get("mode", node.args[2] if len(node.args) > 2 else "constant")
        if x.layout is None or x.flat or not isinstance(pads, (list, tuple)):
            self.block(node, "pad not understood")
            return _Value(None)
        if len(pads) <= 4:
            return x
        value = node.kwargs.get("value", node.args[3] if len(node.args) > 3 else 0)
        if len(pads) == 6 and mode == "constant" and not value and all(
                isinstance(p, int) and p >= 0 for p in pads):
            before, after = pads[4], pads[5]
            layout = (self.fresh(before) if before else []) + list(x.layout) + (
                self.fresh(after) if after else [])
            return _Value(layout)  # zero channels: any order
        self.block(node, "pad over channels")
        return _Value(None)

    def cat(self, node: fx.Node) -> _Value:
        tensors = node.args[0] if node.args else node.kwargs.get("tensors")
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        vals = [self.values.get(t, _Value(None)) if isinstance(t, fx.Node) else _Value(None)
                for t in (tensors or [])]
        if not vals or any(v.layout is None for v in vals):
            self.block(node, "cat of unknown tensors")
            return _Value(None)
        flat = vals[0].flat
        if (flat and dim in (1, -1)) or (not flat and dim == 1):
            layout = [seg for v in vals for seg in v.layout]  # type: ignore[union-attr]
            return _Value(layout, flat)
        if dim == 0:
            for v in vals[1:]:
                self.equal.append((vals[0].layout, v.layout))  # type: ignore[arg-type]
            return vals[0]
        self.block(node, f"cat along dim {dim}")
        return _Value(None)

    def getitem(self, node: fx.Node, x: _Value) -> _Value:
        idx = node.args[1]
        if x.layout is None:
            return _Value(None)
        if isinstance(idx, tuple) and len(idx) >= 2 and all(
                isinstance(i, slice) and i == slice(None) for i in idx[:2]) and all(
                isinstance(i, slice) for i in idx[2:]) and not x.flat:
            return x
        self.block(node, "indexing across channels")
        return _Value(None)

    # -- result ----------------------------------------------------------------------
    def collect(self) -> Analysis:
        u = self.u
        blocked = u.blocked_roots()
        groups: dict[int, Group] = {}
        for role, name, module, layout in self.items:
            offset = 0
            for leaf in u.leaves(layout):
                n = u.length[leaf]
                root = u.find(leaf)
                if n is not None and root not in blocked:
                    groups.setdefault(root, Group(n)).members.append(
                        Member(role, name, module, offset))
                offset += n or 0
        useful = [g for g in groups.values() if g.size > 1 and any(
            m.role == "writer" for m in g.members)]
        return Analysis(useful, self.reasons, traced=True)
