"""SUT: Sparse Universal Transformer (Tan et al., EMNLP 2023), as a decoder-only LM.

One shared layer — mixture-of-attention-heads (MoA) then an FFN MoE — is applied for up to N
steps with stick-breaking halting. A token whose remaining probability mass drops below 1 − τ is
frozen: its state stops changing and its rows are no longer sent to the expert banks (SUT's
compute saving). Halting is per token and causal, so cached decoding (one KV cache per step)
reproduces the full forward exactly. Every bank is still called once per step even when no rows
remain, so all ranks make the same calls.

Defaults follow the authors' code (shawntan/SUT: `halting.py` ACTWrapper, `moe.py`):
- keys/values (`kv_source=soft_halted`): at step n they come from LN of the token's running
  soft-halted state s_{n−1} = Σ_{j<n−1} p_j·h_j + (remaining mass)·h_{n−1} (s_0 = the
  embedding, so steps 1 and 2 see the current state; from step 3 on they differ); a frozen
  token serves its final soft-halted output. `kv_source=state` takes LN of the current state;
- ACT loss: the expected number of steps after the first, Σ_n (n − 1)·p_n (steps counted from
  0); a frozen token's leftover mass (< 1 − τ) counts at its freezing step, where the reference
  drops it and keeps adding the gate's (tiny) halting probabilities of the frozen state;
- MI loss (`mi_weights=remaining_mass`): every row (token, step) weighted by the token's
  remaining halting mass entering that step, in H(E|X) and in the marginal, the weights
  carrying gradient; `mi_weights=uniform` weights the active rows equally. The sign follows the
  paper (−I(E;X)); `mi_reference_sign` gives the code's H(E|X) + H(E).

Legend: B batch, S new positions, P past + new positions, T = B·S tokens, A active (not yet
halted) tokens, D model width, De attention expert width, Hh heads per attention expert
(De / Dh), Dh head width, E experts, K experts per token, M max relative offset,
O relative offsets (2·M + 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.common import losses
from models.common.attention import KVCache
from models.common.context import MoEContext
from models.common.experts import ExpertBank, LinearExperts, MLPExperts
from models.common.layers import Embedding, Linear, reset_unless_meta
from models.common.moe import record_routing
from models.common.router import Router, Routing, route, router_dtype, skew_bias
from models.common.rules import Rule, above, at_least, between, multiple_of, one_of, up_to
from models.spec import ModelSpec, register


@dataclass
class SUTConfig:
    family: str = "sut"
    vocab_size: int = 256
    d_model: int = 64
    max_steps: int = 4  # N applications of the shared layer at most
    att_experts: int = 4
    att_top_k: int = 2
    att_expert_dim: int = 32  # De: one expert's query/output width, split into heads of d_head
    d_head: int = 16
    num_experts: int = 4  # FFN experts
    top_k: int = 2
    expert_hidden: int = 64
    max_rel_pos: int = 63  # relative offsets clipped to ±max_rel_pos
    halt_threshold: float = 0.999  # τ: freeze once the remaining mass < 1 − τ
    aux_mi: float = 0.1  # mutual-information loss, per router
    mi_reference_sign: bool = False  # True: the public code's H(E|X) + H(E) (sign slip)
    mi_weights: str = "remaining_mass"  # remaining_mass (reference code) | uniform
    kv_source: str = "soft_halted"  # soft_halted (reference code) | state
    aux_act: float = 0.01  # ACT loss: mean expected depth
    dropout: float = 0.0  # on both residual branches
    route_skew: float = 0.0
    RULES: ClassVar[tuple[Rule, ...]] = ()  # the table below


# Checked by launch/validation.py before any rank starts; each rule's `bad` value is tested.
RULES = SUTConfig.RULES = (
    one_of("family", ("sut",), "choose the family with model=<family>_<size>, not {key}"),
    at_least("vocab_size", 2, "e.g. {key}=256"),
    at_least("d_model", 1, "e.g. {key}=64"),
    at_least("max_steps", 1, "e.g. {key}=4 (applications of the shared layer)"),
    at_least("att_experts", 1, "e.g. {key}=4"),
    up_to(
        "att_top_k",
        "att_experts",
        "pick 1 … model.att_experts={cfg.att_experts}, or raise model.att_experts",
    ),
    at_least("att_expert_dim", 1, "e.g. {key}=32"),
    at_least("d_head", 1, "e.g. {key}=16"),
    multiple_of(
        "att_expert_dim",
        "d_head",
        "use a multiple of model.d_head={cfg.d_head}, or a model.d_head that divides {key}",
        bad=33,
    ),
    at_least("num_experts", 1, "e.g. {key}=4"),
    up_to(
        "top_k",
        "num_experts",
        "pick 1 … model.num_experts={cfg.num_experts}, or raise model.num_experts",
    ),
    at_least("expert_hidden", 1, "e.g. {key}=64"),
    at_least("max_rel_pos", 0, "e.g. {key}=63 (offsets are clipped to ±{key})"),
    # 0 would halt every token after one step; 1 never halts early.
    above("halt_threshold", 0, "e.g. {key}=0.999 (1 = no early halting)", hi=1),
    at_least("aux_mi", 0, "e.g. {key}=0.1 (0 = off)"),
    one_of("mi_weights", ("remaining_mass", "uniform")),
    one_of("kv_source", ("soft_halted", "state")),
    at_least("aux_act", 0, "e.g. {key}=0.01 (0 = off)"),
    between("dropout", 0, 1, "e.g. {key}=0 (off)", hi_open=True),
    at_least("route_skew", 0, "e.g. {key}=0 (off)", note="a Zipf exponent"),
)


class MLPRouter(Router):
    """SUT router: Linear(D, D) → tanh → Linear(D, E, no bias); logits in fp32 (fp64)."""

    def __init__(self, d_model: int, num_experts: int, route_skew: float) -> None:
        super().__init__()
        self.hidden = nn.Linear(d_model, d_model)  # torch's default init (reference)
        self.out = nn.Linear(d_model, num_experts, bias=False)
        self.num_experts, self.route_skew = num_experts, route_skew
        skew_E = torch.empty(num_experts, dtype=torch.float64)
        self.register_buffer("skew_E", skew_E, persistent=False)
        reset_unless_meta(self)

    def reset_parameters(self) -> None:
        """The non-persistent skew bias, recomputed from the config."""
        with torch.no_grad():
            self.skew_E.copy_(skew_bias(self.num_experts, self.route_skew))

    def logits(self, x_TD: Tensor) -> Tensor:
        dt = router_dtype(x_TD)
        h_TD = torch.tanh(F.linear(x_TD.to(dt), self.hidden.weight.to(dt), self.hidden.bias.to(dt)))
        return F.linear(h_TD, self.out.weight.to(dt)) + self.skew_E.to(dt)


class MixtureOfAttention(nn.Module):
    """MoA: per-expert query W_q [E, D, De] and output W_o [E, De, D]; K and V dense, shared.

    Attention logits are (q·k + q·r_{clip(j−i)}) / √Dh with learned per-head relative position
    embeddings r (reference). Only active tokens query; all tokens' keys/values are kept.
    """

    def __init__(self, cfg: SUTConfig) -> None:
        super().__init__()
        d, E, De, dh = cfg.d_model, cfg.att_experts, cfg.att_expert_dim, cfg.d_head
        if De % dh:
            raise ValueError(f"att_expert_dim={De} is not divisible by d_head={dh}")
        if not 1 <= cfg.att_top_k <= E:
            raise ValueError(f"att_top_k={cfg.att_top_k} must be in [1, att_experts={E}]")
        self.top_k, self.d_head, self.n_heads = cfg.att_top_k, dh, De // dh
        self.max_rel = cfg.max_rel_pos
        self.router = MLPRouter(d, E, cfg.route_skew)
        # reference init: U(±1/fan_in) for expert weights (same std here, normal)
        self.q = LinearExperts(E, d, De, std=1 / (d * math.sqrt(3)))
        self.o = LinearExperts(E, De, d, std=1 / (De * math.sqrt(3)))
        self.kv = Linear(d, 2 * De, bias=False, std=1 / math.sqrt(d + De))  # xavier, gain 1/√2
        self.rel_pos = nn.Parameter(torch.empty(self.n_heads, dh, 2 * cfg.max_rel_pos + 1))
        reset_unless_meta(self)

    def reset_parameters(self) -> None:
        """This module's own parameter: relative position embeddings start at zero."""
        with torch.no_grad():
            self.rel_pos.zero_()

    def forward(
        self,
        xa_AD: Tensor,
        xkv_BSD: Tensor,
        idx_A: Tensor,
        cache: KVCache | None,
        ctx: MoEContext,
    ) -> tuple[Tensor, Tensor]:
        """Update [A, D] of the active tokens `idx_A` (flat indices), whose normalised states are
        `xa_AD`, attending over keys/values from `xkv_BSD`; and their router logits."""
        B, S, D = xkv_BSD.shape
        Hh, dh, K = self.n_heads, self.d_head, self.top_k
        past = cache.length if cache is not None else 0
        k_BHSd, v_BHSd = self.kv(xkv_BSD).view(B, S, 2, Hh, dh).permute(2, 0, 3, 1, 4)
        if cache is not None:
            k_BHSd, v_BHSd = cache.extend(k_BHSd, v_BHSd)
        routing = route(self.router.logits(xa_AD), K, "softmax", renormalize=True)
        counts_E = losses.global_counts(routing, routing.scores_TE.shape[1], ctx.reducer)
        ctx.add_load(self.q.bank_name, counts_E)  # the same rows go through W_q and W_o
        ctx.add_load(self.o.bank_name, counts_E)
        ids_N = routing.expert_TK.reshape(-1)
        self.o.announce(ids_N)  # W_o's rows are known now: the runtime may start its exchange
        q_AKe = self.q(xa_AD.repeat_interleave(K, dim=0), ids_N).view(-1, K, Hh * dh)
        att_AKe = self._attend(q_AKe * dh**-0.5, k_BHSd, v_BHSd, idx_A, (B, S), past)
        y_AKD = self.o(att_AKe.reshape(-1, Hh * dh), ids_N).view(-1, K, D)
        gate_AK1 = routing.gate_TK.to(y_AKD.dtype).unsqueeze(-1)
        return (y_AKD * gate_AK1).sum(1), routing.logits_TE

    def _attend(
        self,
        q_AKe: Tensor,
        k_BHPd: Tensor,
        v_BHPd: Tensor,
        idx_A: Tensor,
        shape: tuple[int, int],
        past: int,
    ) -> Tensor:
        """Causal attention of the active queries (inactive query rows are zero and dropped)."""
        (B, S), K, Hh, dh, P = shape, q_AKe.shape[1], self.n_heads, self.d_head, k_BHPd.shape[2]
        q_TKe = q_AKe.new_zeros(B * S, K, Hh * dh).index_copy(0, idx_A, q_AKe)
        q_BKHSd = q_TKe.view(B, S, K, Hh, dh).permute(0, 2, 3, 1, 4)
        scores_BKHSP = torch.einsum("bkhsd,bhpd->bkhsp", q_BKHSd, k_BHPd)
        scores_BKHSP = scores_BKHSP + self._rel_logits(q_BKHSd, past, P)
        pos_q_S1 = torch.arange(past, past + S, device=q_AKe.device)[:, None]
        future_SP = torch.arange(P, device=q_AKe.device)[None, :] > pos_q_S1
        probs_BKHSP = torch.softmax(scores_BKHSP.masked_fill(future_SP, float("-inf")), dim=-1)
        att_BKHSd = torch.einsum("bkhsp,bhpd->bkhsd", probs_BKHSP, v_BHPd)
        att_TKe = att_BKHSd.permute(0, 3, 1, 2, 4).reshape(B * S, K, Hh * dh)
        return att_TKe.index_select(0, idx_A)

    def _rel_logits(self, q_BKHSd: Tensor, past: int, P: int) -> Tensor:
        """q_i · r_h[clip(j − i, ±M)] for query positions past.. and key positions 0..P−1."""
        S, M = q_BKHSd.shape[3], self.max_rel
        pos_q_S1 = torch.arange(past, past + S, device=q_BKHSd.device)[:, None]
        off_SP = torch.arange(P, device=q_BKHSd.device)[None, :] - pos_q_S1
        idx_SP = off_SP.clamp(-M, M) + M
        table_BKHSO = torch.einsum("bkhsd,hdo->bkhso", q_BKHSd, self.rel_pos)
        idx_BKHSP = idx_SP.expand(*table_BKHSO.shape[:3], S, P)
        return table_BKHSO.gather(-1, idx_BKHSP)


def _combine(experts: ExpertBank, x_AD: Tensor, routing: Routing) -> Tensor:
    """Σ_k gate_k · expert_k(x) like `moe.moe_combine`, but also for zero rows (all halted)."""
    A, K = routing.expert_TK.shape
    y_ND = experts(x_AD.repeat_interleave(K, dim=0), routing.expert_TK.reshape(-1))
    gate_AK1 = routing.gate_TK.to(y_ND.dtype).unsqueeze(-1)
    return (y_ND.view(A, K, experts.out_features) * gate_AK1).sum(1)


class SUTMoE(nn.Module):
    """FFN MoE: GELU experts with biases, MLP router, softmax top-k, renormalised gates."""

    def __init__(self, cfg: SUTConfig) -> None:
        super().__init__()
        d, E, h = cfg.d_model, cfg.num_experts, cfg.expert_hidden
        if not 1 <= cfg.top_k <= E:
            raise ValueError(f"top_k={cfg.top_k} must be in [1, num_experts={E}]")
        self.top_k = cfg.top_k
        self.router = MLPRouter(d, E, cfg.route_skew)
        self.experts = MLPExperts(
            E,
            d,
            h,
            activation="gelu",
            bias=True,
            std_in=1 / (d * math.sqrt(3)),
            std_out=1 / (h * math.sqrt(3)),
        )

    def forward(self, x_AD: Tensor, ctx: MoEContext, batch: int) -> tuple[Tensor, Tensor]:
        routing = route(self.router.logits(x_AD), self.top_k, "softmax", renormalize=True)
        y_AD = _combine(self.experts, x_AD, routing)
        record_routing(ctx, self.experts, routing, {}, batch=batch)
        return y_AD, routing.logits_TE


class SUTLayer(nn.Module):
    """The shared pre-LN layer; updates only the active tokens of the state."""

    def __init__(self, cfg: SUTConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = MixtureOfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.moe = SUTMoE(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(
        self,
        h_TD: Tensor,
        kv_TD: Tensor,
        idx_A: Tensor,
        shape: tuple[int, int],
        ctx: MoEContext,
        cache: KVCache | None,
    ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """Queries from LN1 of the active rows of `h_TD`, keys/values from LN1 of `kv_TD`.

        Returns (new state [T, D], active rows' new state [A, D], router logits).
        """
        B, S = shape
        xn_TD = self.ln1(h_TD)
        xkv_TD = xn_TD if kv_TD is h_TD else self.ln1(kv_TD)
        xa_AD = xn_TD.index_select(0, idx_A)
        att_AD, att_logits = self.attn(xa_AD, xkv_TD.view(B, S, -1), idx_A, cache, ctx)
        h_AD = h_TD.index_select(0, idx_A) + self.drop(att_AD)
        ffn_AD, ffn_logits = self.moe(self.ln2(h_AD), ctx, batch=B)
        h_AD = h_AD + self.drop(ffn_AD)
        return h_TD.index_copy(0, idx_A, h_AD), h_AD, {"att": att_logits, "ffn": ffn_logits}


class HaltingGate(nn.Module):
    """Linear(D, D) → GELU → Linear(D, 2, no bias, zero init) → log-softmax (reference).

    Returns (log α, log(1 − α)) per row in fp32 (fp64); α = 1/2 at init.
    """

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.hidden = nn.Linear(d_model, d_model)
        self.out = Linear(d_model, 2, bias=False, std=0.0)  # zero init: α = 1/2

    def forward(self, h_AD: Tensor) -> tuple[Tensor, Tensor]:
        dt = router_dtype(h_AD)
        logp_A2 = F.log_softmax(self.out(F.gelu(self.hidden(h_AD))).to(dt), dim=-1)
        return logp_A2[:, 1], logp_A2[:, 0]


@dataclass
class _Halting:
    """Stick-breaking state per token: accumulated output, log remaining mass, expected depth,
    the soft-halted state (keys/values source), and per step the active rows' remaining mass."""

    acc_TD: Tensor
    log_rem_T: Tensor
    depth_T: Tensor
    active_T: Tensor  # bool, no gradient
    soft_TD: Tensor  # s_n = acc_{n−1} + rem_{n−1}·h_n for active tokens; s_0 = the embedding
    rem_per_step: list[Tensor]  # [A_n] remaining mass entering step n (the MI loss weights)

    @staticmethod
    def start(h_TD: Tensor) -> _Halting:
        T, dt = h_TD.shape[0], router_dtype(h_TD)
        zeros_T = torch.zeros(T, dtype=dt, device=h_TD.device)
        active_T = torch.ones(T, dtype=torch.bool, device=h_TD.device)
        return _Halting(torch.zeros_like(h_TD), zeros_T, zeros_T, active_T, h_TD, [])


class SUT(nn.Module):
    def __init__(self, cfg: SUTConfig) -> None:
        super().__init__()
        for name, value, known in (
            ("kv_source", cfg.kv_source, ("soft_halted", "state")),
            ("mi_weights", cfg.mi_weights, ("remaining_mass", "uniform")),
        ):
            if value not in known:
                raise ValueError(f"{name}={value!r}: use one of {known}")
        self.cfg = cfg
        std = cfg.d_model**-0.5
        self.embedding = Embedding(cfg.vocab_size, cfg.d_model, std=std)  # ×√D in forward
        self.layer = SUTLayer(cfg)
        self.halt = HaltingGate(cfg.d_model)
        self.out_norm = nn.LayerNorm(cfg.d_model)
        self.lm_head = Linear(cfg.d_model, cfg.vocab_size, bias=False, std=std)

    def new_cache(self) -> list[KVCache]:
        """One KV cache per step: the keys/values every past token had at that step."""
        return [KVCache() for _ in range(self.cfg.max_steps)]

    def forward(
        self, tokens_BS: Tensor, ctx: MoEContext | None = None, cache: list[KVCache] | None = None
    ) -> Tensor:
        ctx = ctx if ctx is not None else MoEContext()
        B, S = tokens_BS.shape
        h_TD = (self.embedding(tokens_BS) * math.sqrt(self.cfg.d_model)).reshape(B * S, -1)
        state = _Halting.start(h_TD)
        logits: dict[str, list[Tensor]] = {"att": [], "ffn": []}
        for n in range(1, self.cfg.max_steps + 1):
            idx_A = state.active_T.nonzero().squeeze(1)
            state.rem_per_step.append(state.log_rem_T.index_select(0, idx_A).exp())
            kv_TD = state.soft_TD if self.cfg.kv_source == "soft_halted" else h_TD
            h_TD, h_AD, step_logits = self.layer(
                h_TD, kv_TD, idx_A, (B, S), ctx, cache[n - 1] if cache else None
            )
            for name, l in step_logits.items():
                logits[name].append(l)
            self._halt_step(state, h_AD, idx_A, n)
        self._aux_losses(state, logits, ctx)
        return self.lm_head(self.out_norm(state.acc_TD.view(B, S, -1)))

    def _halt_step(self, st: _Halting, h_AD: Tensor, idx_A: Tensor, n: int) -> None:
        """Stick-breaking: p_n = α_n · Π_{j<n}(1 − α_j); the last step (or a token that freezes)
        takes all of the token's remaining mass, so Σ_n p_n = 1 and depth = Σ_n (n − 1)·p_n."""
        log_rem_A = st.log_rem_T.index_select(0, idx_A)
        if self.cfg.kv_source == "soft_halted":
            rem_A1 = log_rem_A.exp().to(h_AD.dtype).unsqueeze(1)
            soft_AD = st.acc_TD.index_select(0, idx_A) + rem_A1 * h_AD
            st.soft_TD = st.soft_TD.index_copy(0, idx_A, soft_AD)
        if n < self.cfg.max_steps:
            log_a_A, log_1ma_A = self.halt(h_AD)
            p_A = torch.exp(log_rem_A + log_a_A)
            new_log_rem_A = log_rem_A + log_1ma_A
            freeze_A = new_log_rem_A.detach().exp() < 1 - self.cfg.halt_threshold
            p_A = p_A + torch.where(freeze_A, new_log_rem_A.exp(), torch.zeros_like(p_A))
        else:
            p_A, new_log_rem_A = torch.exp(log_rem_A), torch.full_like(log_rem_A, -math.inf)
            freeze_A = torch.ones_like(idx_A, dtype=torch.bool)
        st.acc_TD = st.acc_TD.index_add(0, idx_A, p_A.to(h_AD.dtype).unsqueeze(1) * h_AD)
        st.depth_T = st.depth_T.index_add(0, idx_A, (n - 1) * p_A)
        st.log_rem_T = st.log_rem_T.index_copy(0, idx_A, new_log_rem_A)
        st.active_T = st.active_T.index_copy(0, idx_A, ~freeze_A)

    def _aux_losses(self, st: _Halting, logits: dict[str, list[Tensor]], ctx: MoEContext) -> None:
        """MI loss per router over its active rows of all steps (weighted by remaining mass by
        default); ACT loss = mean expected depth counted from 0."""
        cfg = self.cfg
        if cfg.aux_mi:
            w_N = torch.cat(st.rem_per_step) if cfg.mi_weights == "remaining_mass" else None
            for name, ls in logits.items():
                mi = losses.mutual_information_loss(
                    torch.cat(ls, dim=0), ctx.reducer, cfg.mi_reference_sign, w_N
                )
                ctx.add_aux(f"mi_{name}", cfg.aux_mi * mi)
        if cfg.aux_act:
            depth = losses.global_mean(st.depth_T.sum(), st.depth_T.shape[0], ctx.reducer)
            ctx.add_aux("act", cfg.aux_act * depth)


SPEC = register(
    ModelSpec(
        name="sut",
        config_cls=SUTConfig,
        builder=SUT,
        presets={
            "tiny": SUTConfig(),
            # WMT14 En-De base (reference scripts/params_de_base.sh) as a decoder-only LM over a
            # 32k joined BPE vocabulary; published dropout 0.2 and ACT 0 (dropout 0 here keeps runs
            # world-size invariant).
            "base": SUTConfig(
                vocab_size=32768,
                d_model=512,
                max_steps=6,
                att_experts=24,
                att_top_k=4,
                att_expert_dim=256,
                d_head=64,
                num_experts=24,
                top_k=4,
                expert_hidden=512,
                aux_mi=0.1,
                aux_act=0.0,
            ),
        },
    )
)
