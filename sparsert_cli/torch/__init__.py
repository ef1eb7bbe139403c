"""PyTorch entry points (extra `[torch]`): prune a model, then swap its sparse layers for kernels.

    from sparsert_cli.torch import prune_, sparsify_, report_table
    prune_(model, 0.9)                                   # magnitude pruning, in place
    report = sparsify_(model.cuda().eval(), (x.cuda(),))  # Conv2d/Linear -> compiled kernels

Inside this package `import torch` is the real PyTorch (absolute imports only).
"""

from __future__ import annotations

from sparsert_cli.torch.prune import prune_
from sparsert_cli.torch.sparsify import FoldedDense, SparseLayer, report_table, sparsify_

__all__ = ["prune_", "sparsify_", "report_table", "SparseLayer", "FoldedDense"]
