"""Which Conv2d/Linear layers sparsify_ can take, with what follows them (BatchNorm, ReLU/ReLU6,
GELU), and which Linear layer a Linear layer's output feeds alone.

The model is traced with torch.fx where that works (torchvision ResNets, MobileNets, plain
transformer blocks); otherwise consecutive children of nn.Sequential containers are read, and
each outermost submodule that traces by itself (Hugging Face BERT's intermediate and output
blocks) is read as a traced model is.
The graph is only *read*: layers are then replaced in place, so the caller's model object stays
the model. A ReLU module used elsewhere too (ResNet's shared `self.relu`) stays in the model after
its fusion: ReLU and ReLU6 are idempotent, so applying it again changes nothing (sparsify_ first
gives each call of such a module in a non-root module its own copy: residual.unshare_activations).
GELU is not idempotent: only an exact nn.GELU (or Hugging Face's GELUActivation) module called
once is fused (it is then replaced by Identity); a shared one, and a functional F.gelu call, stay
in the model and are not fused.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx
import torch.nn.functional as F

_RELU_FUNCTIONS = {F.relu: "relu", torch.relu: "relu", F.relu6: "relu6"}
@dataclass
class Chain:
    """A layer and what it can absorb: a BatchNorm (folded into weight and bias) and a ReLU,
    ReLU6 or GELU (the kernel's epilogue). `act_module` names an activation module that only
    this chain uses (replaced by Identity with the layer); a shared or functional ReLU stays.
    `feeds`: a Linear layer whose output (after act_module) is only ever the input of one call
    of another Linear layer, that layer's name (from the traced graph here; for a model read by
    parts sparsify.py sets it from the recording forward). `depthwise_next`: a 1x1 Conv2d
    layer (one group) whose output (after act_module) is only ever the input of one call of a
    depthwise Conv2d, that layer's name (traced graphs only): the pair sparsify_ may run as one
    fused kernel (pairs.py)."""

    layer: str
    bn: str | None = None
    activation: str = "none"
    act_module: str | None = None
    residual: str | None = None      # the ResidualChain (residual.py) this layer heads
    feeds: str | None = None
    depthwise_next: str | None = None

    @property
    def entry(self) -> str:
        """The module whose call sees the chain's inputs: (x) or (x, residual)."""
        return self.residual or self.layer


def _activation(module) -> str | None:
    if isinstance(module, torch.nn.ReLU):
        return "relu"
    if isinstance(module, torch.nn.ReLU6):
        return "relu6"
    if isinstance(module, torch.nn.Hardtanh) and (module.min_val, module.max_val) == (0.0, 6.0):
        return "relu6"
    if isinstance(module, torch.nn.GELU) and module.approximate == "none":
        return "gelu"
    # Hugging Face's exact GELU module (transformers.activations.GELUActivation, what BERT's
    # ACT2FN["gelu"] gives): F.gelu inside; matched by name, transformers is not a dependency
    if type(module).__name__ == "GELUActivation" and getattr(module, "act", None) is F.gelu:
        return "gelu"
    return None


def idempotent(activation: str) -> bool:
    """Whether applying the activation again changes nothing (ReLU, ReLU6; not GELU): only
    then may a call the model keeps (a shared module, a function) be fused too."""
    return activation in ("relu", "relu6")


def _is_layer(module) -> bool:
    return isinstance(module, (torch.nn.Conv2d, torch.nn.Linear))


def _fx_chains(model: torch.nn.Module, shared=frozenset(), part: bool = False
               ) -> list[Chain] | None:
    """The chains of a model that torch.fx traces, or None. `shared`: ids of modules held in
    more than one place of the whole model (tracing a submodule alone cannot see their other
    calls): such an activation module is not taken out with a layer. `part`: a submodule,
    read only when its forward has no argument with a default (tracing keeps one branch of
    `if mask is None`, which a call without it would not take)."""
    from sparsert_cli.torch.prune import is_depthwise
    from sparsert_cli.torch.residual import ResidualChain, has_optional_arguments

    class Tracer(torch.fx.Tracer):          # a fused residual chain is one call, and so is
        def is_leaf_module(self, module, qualified_name) -> bool:    # an activation module
            return isinstance(module, ResidualChain) or _activation(module) is not None or \
                super().is_leaf_module(module, qualified_name)
    try:
        graph = Tracer().trace(model)
    except Exception:  # noqa: BLE001 - untraceable models use the nn.Sequential reading
        return None
    if part and has_optional_arguments(graph):
        return None
    modules = dict(model.named_modules())
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1

    def only_user(node):
        users = list(node.users)
        return users[0] if len(users) == 1 else None

    chains = []
    for node in graph.nodes:
        if node.op != "call_module" or not _is_layer(modules.get(node.target)):
            continue
        chain, end = Chain(node.target), node
        nxt = only_user(end)
        if (isinstance(modules[node.target], torch.nn.Conv2d) and nxt is not None
                and nxt.op == "call_module" and calls.get(nxt.target) == 1
                and isinstance(modules.get(nxt.target), torch.nn.BatchNorm2d)):
            chain.bn, end = nxt.target, nxt
        nxt = only_user(end)
        if nxt is not None and nxt.args and nxt.args[0] is end:
            act = _activation(modules.get(nxt.target)) if nxt.op == "call_module" else None
            if act and calls.get(nxt.target) == 1 and id(modules[nxt.target]) not in shared:
                chain.activation, chain.act_module = act, nxt.target
            elif act and idempotent(act):          # shared: stays, and applies once more
                chain.activation = act
            elif nxt.op == "call_function" and nxt.target in _RELU_FUNCTIONS:
                chain.activation = _RELU_FUNCTIONS[nxt.target]
            elif nxt.op == "call_method" and nxt.target in ("relu", "relu_"):
                chain.activation = "relu"
        out = nxt if chain.act_module else end if chain.activation == "none" else None
        user = only_user(out) if out is not None else None
        if (isinstance(modules[node.target], torch.nn.Linear) and calls[node.target] == 1
                and user is not None and user.op == "call_module" and not user.kwargs
                and calls.get(user.target) == 1):
            reader = modules.get(user.target)
            if isinstance(reader, torch.nn.Linear) and user.args == (out,):
                chain.feeds = user.target
            elif (isinstance(reader, ResidualChain) and isinstance(reader.conv, torch.nn.Linear)
                  and len(user.args) == 2 and user.args[0] is out and user.args[1] is not out):
                chain.feeds = f"{user.target}.conv"     # a Linear layer + its residual add
        if (_pointwise(modules[node.target]) and calls[node.target] == 1 and user is not None
                and user.op == "call_module" and not user.kwargs and user.args == (out,)
                and calls.get(user.target) == 1 and is_depthwise(modules.get(user.target))):
            chain.depthwise_next = user.target
        chains.append(chain)
    return chains


def _pointwise(module) -> bool:
    """A 1x1 Conv2d of one group, stride 1, no padding."""
    return (isinstance(module, torch.nn.Conv2d) and module.groups == 1
            and tuple(module.kernel_size) == (1, 1) and tuple(module.stride) == (1, 1)
            and tuple(module.padding) == (0, 0))


def _places(model: torch.nn.Module) -> dict[int, int]:
    """id(module) -> how many places of the model hold it."""
    places: dict[int, int] = {}
    for _, module in model.named_modules(remove_duplicate=False):
        places[id(module)] = places.get(id(module), 0) + 1
    return places


def _sequential_chains(model: torch.nn.Module) -> list[Chain]:
    chains, seen = [], set()
    places = _places(model)
    for prefix, container in model.named_modules():
        if not isinstance(container, torch.nn.Sequential):
            continue
        items = list(container.named_children())
        for i, (name, module) in enumerate(items):
            if not _is_layer(module):
                continue
            full = f"{prefix}.{name}" if prefix else name
            chain, j = Chain(full), i + 1
            if (isinstance(module, torch.nn.Conv2d) and j < len(items)
                    and isinstance(items[j][1], torch.nn.BatchNorm2d)):
                chain.bn = f"{prefix}.{items[j][0]}" if prefix else items[j][0]
                j += 1
            act = _activation(items[j][1]) if j < len(items) else None
            if act and (places[id(items[j][1])] == 1 or idempotent(act)):
                chain.activation = act
                chain.act_module = f"{prefix}.{items[j][0]}" if prefix else items[j][0]
            chains.append(chain)
            seen.add(full)
    for name, module in model.named_modules():     # layers outside any Sequential: alone
        if _is_layer(module) and name not in seen:
            chains.append(Chain(name))
    return chains


def _chains_by_parts(model: torch.nn.Module) -> list[Chain]:
    """The chains of a model that does not trace as a whole (Hugging Face models): the
    nn.Sequential reading, then each outermost submodule that does trace (not a container)
    read as _fx_chains reads a model, its chains replacing those of its layers."""
    chains = {c.layer: c for c in _sequential_chains(model)}
    places = _places(model)
    shared = frozenset(i for i, n in places.items() if n > 1)
    traced: list[str] = []
    for name, module in model.named_modules():
        if (not name or _is_layer(module) or places[id(module)] > 1
                or isinstance(module, (torch.nn.Sequential, torch.nn.ModuleList,
                                       torch.nn.ModuleDict))
                or any(name.startswith(f"{t}.") for t in traced)
                or not any(_is_layer(m) for m in module.modules())):
            continue
        found = _fx_chains(module, shared, part=True)
        if found is None:
            continue
        traced.append(name)
        for chain in found:
            for field in ("layer", "bn", "act_module", "residual", "feeds"):
                value = getattr(chain, field)
                if value is not None:
                    setattr(chain, field, f"{name}.{value}")
            chains[chain.layer] = chain
    return list(chains.values())


def traces_whole(model: torch.nn.Module) -> bool:
    """Whether torch.fx traces the model as a whole (find_chains then reads hand-offs from its
    graph; a model read by parts gets them from the recording forward, sparsify.py)."""
    return _fx_chains(model) is not None


def find_chains(model: torch.nn.Module) -> list[Chain]:
    """Every Conv2d/Linear of the model with the BatchNorm and activation it can absorb, and
    one chain per ResidualChain (conv, BatchNorm, residual add, activation)."""
    from sparsert_cli.torch.residual import ResidualChain

    chains = _fx_chains(model)
    chains = chains if chains is not None else _chains_by_parts(model)
    inner = {n for n, m in model.named_modules() if isinstance(m, ResidualChain)}
    chains = [c for c in chains if not any(c.layer.startswith(f"{n}.") for n in inner)]
    for name in inner:
        chain = model.get_submodule(name)
        chains.append(Chain(f"{name}.conv", f"{name}.bn" if chain.bn is not None else None,
                            chain.activation, residual=name))
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    return sorted(chains, key=lambda c: order.get(c.layer, len(order)))


@torch.no_grad()
def folded(layer: torch.nn.Module, bn: torch.nn.Module | None):
    """(weight, bias) of layer followed by an eval-mode BatchNorm, as float32 CPU tensors:
    W' = W * g / sqrt(var + eps) per output channel, b' = (b - mean) * g / sqrt(var + eps) + beta.
    Scaling rows keeps the zeros, so the sparsity pattern is unchanged. bias is None when the
    layer has none and there is no BatchNorm."""
    weight = layer.weight.detach().to("cpu", torch.float32)
    bias = None if layer.bias is None else layer.bias.detach().to("cpu", torch.float32)
    if bn is None:
        return weight.clone(), None if bias is None else bias.clone()
    mean = bn.running_mean.detach().to("cpu", torch.float32)
    var = bn.running_var.detach().to("cpu", torch.float32)
    gamma = (bn.weight.detach().to("cpu", torch.float32) if bn.weight is not None
             else torch.ones_like(mean))
    beta = (bn.bias.detach().to("cpu", torch.float32) if bn.bias is not None
            else torch.zeros_like(mean))
    scale = gamma / torch.sqrt(var + bn.eps)
    weight = weight * scale.view(-1, *([1] * (weight.dim() - 1)))
    base = bias if bias is not None else torch.zeros_like(mean)
    return weight, (base - mean) * scale + beta
