"""Sparse collectives for FSSDP: placements, spAG / spRS, token dispatch (collectives/README.md)."""

from collectives.algorithms import (
    Algorithm,
    algorithm_costs,
    choose,
    choose_algorithm,
    register,
    unregister,
)
from collectives.comm import CollectiveError, CommStats
from collectives.dispatch import all_gather_counts, all_to_all_rows, exchange_counts
from collectives.link_probe import probe_cost_model
from collectives.placement import Placement, Topology
from collectives.schedule import DEFAULT_COST, CostModel, Schedule
from collectives.sparse import SparseHandle, sparse_all_gather, sparse_reduce_scatter

__all__ = [
    "DEFAULT_COST",
    "Algorithm",
    "CollectiveError",
    "CommStats",
    "CostModel",
    "Placement",
    "Schedule",
    "SparseHandle",
    "Topology",
    "all_gather_counts",
    "algorithm_costs",
    "all_to_all_rows",
    "probe_cost_model",
    "choose",
    "choose_algorithm",
    "exchange_counts",
    "register",
    "sparse_all_gather",
    "sparse_reduce_scatter",
    "unregister",
]
