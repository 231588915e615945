"""Sparse collectives for FSSDP: placements, spAG / spRS, token dispatch (DESIGN.md §2)."""

from collectives.calibrate import calibrate_cost_model
from collectives.comm import CollectiveError, CommStats
from collectives.dispatch import all_gather_counts, all_to_all_rows, exchange_counts
from collectives.placement import Placement, Topology
from collectives.schedule import DEFAULT_COST, CostModel, algorithm_costs, choose_algorithm
from collectives.sparse import SparseHandle, sparse_all_gather, sparse_reduce_scatter

__all__ = [
    "DEFAULT_COST",
    "CollectiveError",
    "CommStats",
    "CostModel",
    "Placement",
    "SparseHandle",
    "Topology",
    "all_gather_counts",
    "algorithm_costs",
    "all_to_all_rows",
    "calibrate_cost_model",
    "choose_algorithm",
    "exchange_counts",
    "sparse_all_gather",
    "sparse_reduce_scatter",
]
