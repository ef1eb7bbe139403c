"""sparsert: compile a sparse weight's pattern into a GPU kernel (SparseRT, PACT 2020)."""

__version__ = "0.1.0"
