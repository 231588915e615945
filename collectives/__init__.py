"""Sparse collectives for FSSDP: placements, spAG / spRS, token dispatch (DESIGN.md §2)."""

from collectives.comm import CollectiveError, CommStats
from collectives.dispatch import all_gather_counts, all_to_all_rows, exchange_counts
from collectives.placement import Placement, Topology
from collectives.schedule import DEFAULT_ALPHA_BYTES, choose_algorithm
from collectives.sparse import SparseHandle, sparse_all_gather, sparse_reduce_scatter

__all__ = [
    "DEFAULT_ALPHA_BYTES",
    "CollectiveError",
    "CommStats",
    "Placement",
    "SparseHandle",
    "Topology",
    "all_gather_counts",
    "all_to_all_rows",
    "choose_algorithm",
    "exchange_counts",
    "sparse_all_gather",
    "sparse_reduce_scatter",
]
