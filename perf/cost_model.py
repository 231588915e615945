"""Cost model of the cluster-scale simulator: hardware, workload, compute and transfer times.

Legend: W ranks (devices), E experts of a bank, d model width, h expert hidden width, S sequence
length, V vocabulary; a *bytes matrix* M[s][r] holds the bytes rank s sends rank r in one
collective.

[Note: link model]
A collective's time is set by its busiest link: every device has one intra-node link (NVLink /
shared memory) that sends and receives `intra_bw` bytes/s each way, every node one NIC shared by
its devices with `inter_bw` bytes/s each way. Intra- and inter-node traffic run concurrently, so
time = max(busiest device's intra bytes / intra_bw, busiest node's inter bytes / inter_bw)
+ latency. Bytes a rank "sends" to itself cost nothing.

[Note: compute model]
FLOPs per token: attention forward 8d² (Q, K, V, O projections) + 4·S·d (scores and values,
dense as on CPU), head 2·d·V, one expert row 4·d·h (two matmuls); backward costs twice the
forward. Dense work runs at `flops`, grouped expert matmuls at `expert_flops`; the optimizer step
costs `opt_s_per_param` seconds per parameter a rank updates.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

GB = 1e9


@dataclass(frozen=True)
class Cluster:
    name: str
    nodes: int
    per_node: int  # devices per node
    flops: float  # effective dense FLOP/s per device
    expert_flops: float  # effective FLOP/s of the expert matmuls per device
    intra_bw: float  # bytes/s each way per device inside a node
    inter_bw: float  # bytes/s each way per node NIC
    latency_s: float = 0.0  # per collective
    opt_s_per_param: float = 0.0  # optimizer step time per parameter a rank holds
    step_overhead_s: float = 0.0  # per step, every system alike (data, launch, bookkeeping)

    @property
    def world(self) -> int:
        return self.nodes * self.per_node

    def node_of(self, rank: int) -> int:
        return rank // self.per_node

    def with_world(self, world: int) -> Cluster:
        """The same devices, `world` of them (whole nodes, or one partial node)."""
        if world <= self.per_node:
            return replace(self, nodes=1, per_node=world)
        return replace(self, nodes=world // self.per_node)


@dataclass(frozen=True)
class Workload:
    d_model: int
    n_layers: int
    seq_len: int
    tokens_per_rank: int
    num_experts: int
    top_k: int
    expert_hidden: int
    vocab: int
    act_bytes: int = 2  # bytes per activation element moved by the all-to-alls
    param_bytes: int = 2  # bytes per parameter element moved by (sparse) all-gathers
    grad_bytes: int = 2  # bytes per gradient element moved by reduce(-scatter)s

    @property
    def expert_params(self) -> int:
        d, h = self.d_model, self.expert_hidden
        return 2 * d * h + h + d

    @property
    def dense_params_per_layer(self) -> int:
        return 4 * self.d_model**2 + 4 * self.d_model + self.num_experts * self.d_model

    @property
    def embed_params(self) -> int:
        return (self.vocab + self.seq_len) * self.d_model

    @property
    def rows_per_rank(self) -> int:
        return self.tokens_per_rank * self.top_k


# -- compute ---------------------------------------------------------------------------------


def attn_fwd_s(w: Workload, c: Cluster) -> float:
    """One layer's dense forward on one rank."""
    d = w.d_model
    return w.tokens_per_rank * (8 * d * d + 4 * w.seq_len * d) / c.flops


def head_fwd_s(w: Workload, c: Cluster) -> float:
    return w.tokens_per_rank * 2 * w.d_model * w.vocab / c.flops


def expert_s(rows: int, w: Workload, c: Cluster) -> float:
    """Forward + backward of `rows` expert rows on one rank."""
    return 3 * rows * 4 * w.d_model * w.expert_hidden / c.expert_flops


# -- transfers -------------------------------------------------------------------------------


def transfer_s(m_SR: Any, c: Cluster) -> float:
    """Time of one collective with bytes matrix m_SR ([W, W] tensor or nested sequence, W =
    c.world), per [Note: link model]: the busiest device link inside a node or the busiest NIC
    across nodes; bytes to oneself are free."""
    m = torch.as_tensor(m_SR, dtype=torch.float64)
    W = m.shape[0] if m.dim() == 2 else 0
    if W == 0:
        return 0.0
    if W != c.world:
        raise ValueError(f"transfer_s: a {W}x{W} bytes matrix on a cluster of {c.world} ranks")
    pn, nodes, self_b = c.per_node, c.nodes, m.diagonal()
    blocks = m.view(nodes, pn, nodes, pn).diagonal(dim1=0, dim2=2)  # [pn, pn, nodes]
    intra_out = blocks.sum(1).T.reshape(W) - self_b
    intra_in = blocks.sum(0).T.reshape(W) - self_b
    t_intra = max(float(intra_out.max()), float(intra_in.max())) / c.intra_bw
    t_inter = 0.0
    if nodes > 1:
        out_n = (m.sum(1) - self_b - intra_out).view(nodes, pn).sum(1)
        in_n = (m.sum(0) - self_b - intra_in).view(nodes, pn).sum(1)
        t_inter = max(float(out_n.max()), float(in_n.max())) / c.inter_bw
    busy = t_intra > 0 or t_inter > 0
    return max(t_intra, t_inter) + (c.latency_s if busy else 0.0)


def all_gather_s(shard_bytes: float, world: int, c: Cluster) -> float:
    """All-gather (or reduce-scatter) of a `shard_bytes`-per-rank shard over `world` ranks, in
    closed form: each rank sends its shard to every other rank (intra and inter shares)."""
    if world <= 1:
        return 0.0
    per_node = min(c.per_node, world)
    intra = (per_node - 1) * shard_bytes / c.intra_bw
    inter = per_node * (world - per_node) * shard_bytes / c.inter_bw if world > per_node else 0.0
    return max(intra, inter) + c.latency_s


def all_reduce_s(total_bytes: float, world: int, c: Cluster) -> float:
    """Ring-style all-reduce = reduce-scatter + all-gather of 1/world shards."""
    return 2 * all_gather_s(total_bytes / world, world, c) if world > 1 else 0.0


def even_sources(rows_E: Sequence[int], world: int) -> torch.Tensor:
    """[W, E] int64 rows per source rank: each expert's rows split evenly over the ranks (tokens
    are drawn alike on every rank); leftovers go to ranks e, e+1, … so no rank is always
    favoured."""
    n_E = torch.as_tensor(list(rows_E), dtype=torch.int64).reshape(-1)
    q, rem = n_E // world, n_E % world
    s_W, e_E = torch.arange(world)[:, None], torch.arange(n_E.numel())[None, :]
    return q[None, :] + ((s_W - e_E) % world < rem[None, :]).to(torch.int64)


def scale_rows(load_E: Sequence[float], total_rows: int) -> list[int]:
    """Integer rows per expert in proportion to `load_E`, summing to `total_rows` (largest
    remainder)."""
    tot = float(sum(load_E))
    if tot <= 0:
        return [0] * len(load_E)
    exact = [total_rows * x / tot for x in load_E]
    rows = [int(x) for x in exact]
    order = sorted(range(len(exact)), key=lambda e: (rows[e] - exact[e], e))
    for e in order[: total_rows - sum(rows)]:
        rows[e] += 1
    return rows
