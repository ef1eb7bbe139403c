"""Residual adds sparsify_ can fuse: `act(bn(conv(x)) + identity)` inside a module's forward
(ResNet's Bottleneck), and `linear(x) + residual` (a transformer block's attention output and FFN
down, before their LayerNorm; a Dropout module between the layer and the add, as in HF BERT, is
stepped over: eval mode only). Such a module is traced with torch.fx (its children as leaves) and
rewritten so the ops become one ResidualChain child taking (x, residual); the parent then
holds the rewritten GraphModule in its place. The rewrite alone changes no number (the chain
runs the same modules); sparsify_ can then give the chain one kernel whose epilogue adds the
identity and applies the activation. The model's root module itself is never rewritten, nor
a module whose forward has an argument with a default (`if mask is None`: tracing keeps only
the branch of a call that passes it). The rewritten module keeps its plain attributes but
not its other methods, and side effects of its forward run once, while it is traced; an
in-place `out += fc(x)` is traced as `out + fc(x)` (harmless for a local `out`, as in ResNet,
not for a tensor the caller reads afterwards).

`unshare_activations` gives every call of a ReLU/ReLU6 module used several times in one forward
(ResNet's shared `self.relu`) its own copy, by the same rewrite, so a kernel that fuses one call
can take that call out of the model instead of leaving an idempotent ReLU kernel behind.
"""

from __future__ import annotations

import copy
import operator

import torch
import torch.fx
import torch.nn.functional as F

from sparsert_cli.torch.activations import activate

_ADDS = {operator.add, torch.add}
_RELU = {F.relu: "relu", torch.relu: "relu", F.relu6: "relu6"}


class ResidualChain(torch.nn.Module):
    """act(dropout(bn(conv(x))) + residual), where `conv` is a Conv2d (with or without a
    BatchNorm) or a Linear layer (no BatchNorm) and `dropout` an optional Dropout module (HF
    BERT's, between its dense layer and the add: the identity in eval mode, the only mode
    sparsify_ serves); `sparse` (a SparseLayer with a residual epilogue) replaces conv, bn,
    dropout, add and act in one kernel once sparsify_ sets it."""

    def __init__(self, conv, bn, activation: str, dropout=None):
        super().__init__()
        self.conv, self.bn, self.activation = conv, bn, activation
        self.dropout = dropout
        self.sparse = None

    def forward(self, x, residual):
        if self.sparse is not None:
            return self.sparse(x, residual)
        y = self.conv(x)
        y = self.bn(y) if self.bn is not None else y
        y = (self.dropout(y) if self.dropout is not None else y) + residual
        return activate(y, self.activation)


class _ChildrenAreLeaves(torch.fx.Tracer):
    def __init__(self, root):
        super().__init__()
        self.root_module = root

    def is_leaf_module(self, module, qualified_name) -> bool:
        return module is not self.root_module


def _activation_of(node, modules) -> str | None:
    if node.op == "call_module":
        module = modules.get(node.target)
        if isinstance(module, torch.nn.ReLU):
            return "relu"
        if isinstance(module, torch.nn.ReLU6):
            return "relu6"
    if node.op == "call_function" and node.target in _RELU:
        return _RELU[node.target]
    if node.op == "call_method" and node.target in ("relu", "relu_"):
        return "relu"
    return None


def has_optional_arguments(graph) -> bool:
    """Whether the traced forward has an argument with a default (or *args / **kwargs).
    Tracing makes every argument a value that is given, so a forward testing one (`if mask is
    not None`, `if inputs_embeds is None`: a test that leaves no node in the graph) keeps only
    the branch of a call that passes it; a rewrite, or fusions read from that graph, would be
    wrong for calls that leave it out (MobileBERT's embeddings). Such forwards are left alone."""
    return any(node.op == "placeholder" and (node.args or node.target.startswith("*"))
               for node in graph.nodes)


def _rewrite(owner: torch.nn.Module):
    """owner's forward as a GraphModule with every fusable site a ResidualChain, or None."""
    try:
        tracer = _ChildrenAreLeaves(owner)
        graph = tracer.trace(owner)
    except Exception:  # noqa: BLE001 - an untraceable forward keeps its adds
        return None
    if has_optional_arguments(graph):
        return None
    modules = dict(owner.named_children())
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    found = 0
    for node in list(graph.nodes):
        conv = modules.get(node.target) if node.op == "call_module" else None
        if not isinstance(conv, (torch.nn.Conv2d, torch.nn.Linear)) or calls[node.target] != 1 \
                or len(node.args) != 1 or node.kwargs:
            continue
        end, bn, dropout, inner = node, None, None, [node]

        def only_module_user(kind):
            users = list(end.users)
            if (len(users) == 1 and users[0].op == "call_module" and users[0].args == (end,)
                    and not users[0].kwargs and calls.get(users[0].target) == 1
                    and isinstance(modules.get(users[0].target), kind)):
                return users[0]
            return None

        user = only_module_user(torch.nn.BatchNorm2d)
        if isinstance(conv, torch.nn.Conv2d) and user:
            end, bn = user, modules[user.target]
            inner.append(end)
        user = only_module_user(torch.nn.Dropout)
        if user:
            end, dropout = user, modules[user.target]
            inner.append(end)
        users = list(end.users)
        if len(users) != 1 or users[0].op != "call_function" or users[0].target not in _ADDS \
                or len(users[0].args) != 2 or users[0].kwargs:
            continue
        add = users[0]
        other = add.args[1] if add.args[0] is end else add.args[0]
        # a parameter or buffer (`get_attr`) is a bias-like constant, not a residual: the add
        # stays (a trained one would also make the kernel's input require grad)
        if other is end or not isinstance(other, torch.fx.Node) or other.op == "get_attr":
            continue
        users = list(add.users)
        act = _activation_of(users[0], modules) if len(users) == 1 else None
        last = users[0] if act else add
        name = f"{node.target}_residual"
        owner.add_module(name, ResidualChain(conv, bn, act or "none", dropout))
        with graph.inserting_after(last):
            fused = graph.call_module(name, (node.args[0], other))
        last.replace_all_uses_with(fused)
        for dead in ([last, add] if act else [add]) + inner[::-1]:
            graph.erase_node(dead)
        found += 1
    if not found:
        return None
    graph.lint()
    return torch.fx.GraphModule(owner, graph, class_name=type(owner).__name__ + "Fused")


def _unshared(owner: torch.nn.Module):
    """owner's forward as a GraphModule in which each call of a shared activation module calls
    its own copy, or None (nothing shared, or an untraceable forward)."""
    try:
        graph = _ChildrenAreLeaves(owner).trace(owner)
    except Exception:  # noqa: BLE001 - an untraceable forward keeps its shared modules
        return None
    modules = dict(owner.named_children())
    sites: dict[str, list] = {}
    for node in graph.nodes:
        if node.op == "call_module" and _activation_of(node, modules):
            sites.setdefault(node.target, []).append(node)
    changed = False
    for target, nodes in sites.items():
        for node in nodes[1:]:
            i = 1
            while hasattr(owner, f"{target}_{i}"):
                i += 1
            owner.add_module(f"{target}_{i}", copy.deepcopy(modules[target]))
            node.target = f"{target}_{i}"
            changed = True
    if not changed:
        return None
    graph.lint()
    return torch.fx.GraphModule(owner, graph, class_name=type(owner).__name__.removesuffix(
        "Unshared") + "Unshared")


def _rewrite_children(model: torch.nn.Module, has, rewrite, skip=()) -> list[str]:
    """Replace, in its parent, every non-root module (not a container, a ResidualChain or one
    of `skip`) with a child of type `has` by rewrite(module) where that returns one; the
    rewritten modules' names."""
    done = []
    for name, module in list(model.named_modules()):
        if not name or isinstance(module, (torch.nn.Sequential, torch.nn.ModuleList,
                                           ResidualChain, *skip)):
            continue
        if not any(isinstance(c, has) for c in module.children()):
            continue
        rewritten = rewrite(module)
        if rewritten is not None:
            for key, value in vars(module).items():     # plain attributes others may read
                if not key.startswith("_") and key not in vars(rewritten):
                    setattr(rewritten, key, value)
            model.set_submodule(name, rewritten)
            done.append(name)
    return done


def unshare_activations(model: torch.nn.Module) -> list[str]:
    """Rewrite every non-root module that calls one ReLU/ReLU6 module more than once so each
    call has its own (stateless) copy, in place in its parent; returns the rewritten modules'
    names. Numbers are unchanged."""
    return _rewrite_children(model, (torch.nn.ReLU, torch.nn.ReLU6), _unshared)


def fuse_residuals(model: torch.nn.Module) -> list[str]:
    """Rewrite every non-root module with a fusable residual site (a Conv2d or Linear layer
    whose output, after a Conv2d's BatchNorm, is only added to another tensor), in place in its
    parent; returns the rewritten modules' names."""
    return _rewrite_children(model, (torch.nn.Conv2d, torch.nn.Linear), _rewrite,
                             skip=(torch.fx.GraphModule,))
