"""`parallel=ep`: static owners (contiguous blocks), tokens go to owners by all-to-all.

Nothing of FSSDP runs on this path: no placement planning, no sparse collectives, no copies of
the owned rows ([Note: expert parameters] in fssdp/expert_params.py; fssdp/ep.py). The fair
baseline.
"""

from __future__ import annotations

from torch import nn

from collectives.placement import Topology
from fssdp.config import ParallelConfig
from fssdp.dispatch import CallStats
from fssdp.ep import EPExecutor
from fssdp.sharding import contiguous_sharding
from fssdp.strategies.base import LocalMetrics
from fssdp.strategies.registry import register
from fssdp.strategies.sharded import ExpertSharded
from models.common.experts import ExpertBank


@register("ep")
class EPParallel(ExpertSharded):
    def __init__(
        self, model: nn.Module, cfg: ParallelConfig, topology: Topology, units: list[nn.Module]
    ) -> None:
        W = topology.world_size
        banks = [m for m in model.modules() if isinstance(m, ExpertBank)]
        owners = {b.bank_name: contiguous_sharding(b.num_experts, W) for b in banks}
        super().__init__(model, cfg, topology, units, owners)
        self.executors = {
            name: EPExecutor(
                bank, self.owner_tensor(name), self.count_exchanges[name], self.compute_dtype
            )
            for name, bank in self.banks.items()
        }
        for name, bank in self.banks.items():
            bank.executor = self.executors[name]

    def finish_backward(self) -> None:
        for ex in self.executors.values():
            ex.finish(self.world)

    def collect_step(self) -> LocalMetrics:
        out = super().collect_step()
        out.comm_bytes["a2a"] = sum(ex.stats.bytes["a2a"] for ex in self.exchanges.values())
        out.expert_time_s = sum(ex.stats.expert_time_s for ex in self.exchanges.values())
        out.rows_computed = sum(ex.stats.rows_computed for ex in self.exchanges.values())
        out.replicas = {name: [0] * len(o) for name, o in self.owner.items()}
        for ex in self.exchanges.values():
            ex.stats = CallStats()
        return out
