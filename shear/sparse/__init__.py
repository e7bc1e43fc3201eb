"""Unstructured and N:M sparsity: magnitude, Wanda and SparseGPT masks, OWL allocation, layer-sequential
calibration, sparse recovery and the two export forms (dense with zeros; compressed-tensors).

    from shear.sparse import SparsifyConfig, sparsify_
    sparsify_(model, SparsifyConfig(method="sparsegpt", sparsity=0.5), ids)
"""
from shear.sparse.config import SparsifyConfig
from shear.sparse.sequential import SparsifyResult, sparsify_

__all__ = ["SparsifyConfig", "SparsifyResult", "sparsify_"]
