"""Sparse inference: the bitmap format, SparseLinear, the fused Triton kernel (CUDA) and the measured CPU paths.

    from shear.kernels import to_sparse_linear_
    to_sparse_linear_(model)            # after shear sparsify: masked linears -> SparseLinear
    model.generate(...)

Math apart from glue: ``format`` (encode / decode / reference), ``triton_kernel`` (the kernel and its
launch heuristics), ``cpu`` (CPU paths and their rule); ``sparse_linear`` is the module and the swap.
"""
from shear.kernels.format import BitmapTiles, decode, encode, reference_linear
from shear.kernels.sparse_linear import SparseLinear, SparseLinearConfig, to_sparse_linear_

__all__ = ["BitmapTiles", "SparseLinear", "SparseLinearConfig", "decode", "encode", "reference_linear",
           "to_sparse_linear_"]
