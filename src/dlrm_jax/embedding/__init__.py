"""Embedding tables outside the dense model: layout, lookups, sparse optimisers."""

from dlrm_jax.embedding.collection import (EmbeddingCollection, IdOutOfRangeError, SequenceSpec,
                                           TableSpec, Tables, gather_rows)
from dlrm_jax.embedding.optimizers import (SPARSE_OPTIMIZERS, SparseAdagrad, SparseLazyAdam,
                                           SparseRowWiseAdagrad, SparseSGD, make_sparse_optimizer,
                                           sum_duplicates)

__all__ = [
    "EmbeddingCollection", "IdOutOfRangeError", "SequenceSpec", "TableSpec", "Tables", "gather_rows",
    "SPARSE_OPTIMIZERS", "SparseAdagrad", "SparseLazyAdam", "SparseRowWiseAdagrad", "SparseSGD",
    "make_sparse_optimizer", "sum_duplicates",
]
