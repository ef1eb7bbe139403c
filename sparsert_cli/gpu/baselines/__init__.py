"""Library baselines, one library per module, all timed with gpu/timing.py. Library imports
(nvmath, cudnn) happen inside the constructors, never at import time."""

from .cublas import CublasGemm
from .cudnn import CudnnConv, conv_graph
from .cusparse import CusparseSpmm
from .im2col import Im2colCusparse, im2col_source

__all__ = ["CublasGemm", "CudnnConv", "CusparseSpmm", "Im2colCusparse", "conv_graph",
           "im2col_source"]
