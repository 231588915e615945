"""The models announce a bank call's routing early where they know it ([Note: announced routing]
in fssdp/counts.py): MoEUT's output-projection experts (chosen with the value experts, before
attention) and SUT's MoA output projection (the query projection's selection). What is
announced must be exactly what the call then routes, and it must come before other bank calls
of the layer, or the runtime could not overlap anything."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from models.common.experts import ExpertBank
from models.registry import build_model, preset


def _trace(name: str) -> list[tuple[str, str, Tensor]]:
    torch.manual_seed(0)
    model = build_model(preset(name)).to(torch.float64)
    events: list[tuple[str, str, Tensor]] = []

    def call(bank: ExpertBank, x_ND: Tensor, e_N: Tensor) -> Tensor:
        events.append(("call", bank.bank_name, e_N.clone()))
        return bank.compute(bank.stacked(), x_ND, e_N)

    for bank in model.modules():
        if isinstance(bank, ExpertBank):
            bank.executor = call
            bank.announcer = lambda e_N, n=bank.bank_name: events.append(
                ("announce", n, e_N.clone())
            )
    x = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model(x)
    return events


@pytest.mark.parametrize("name, bank", [("moeut_tiny", "attention.o"), ("sut_tiny", "attn.o")])
def test_announced_ids_are_the_next_calls_and_come_early(name: str, bank: str) -> None:
    events = _trace(name)
    announced = [i for i, (kind, _, _) in enumerate(events) if kind == "announce"]
    assert announced and all(events[i][1].endswith(bank) for i in announced)
    for i in announced:
        _, who, ids = events[i]
        later = [j for j in range(i + 1, len(events)) if events[j][1] == who]
        assert later, f"{who}: announced but never called"
        j = later[0]
        assert events[j][0] == "call" and torch.equal(events[j][2], ids)
        # another bank's call sits between: the exchange has something to hide behind
        assert any(events[k][0] == "call" for k in range(i + 1, j))


def test_a_bank_without_runtime_ignores_announcements() -> None:
    torch.manual_seed(0)
    model = build_model(preset("moeut_tiny")).to(torch.float64)
    x = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x)
        for bank in model.modules():
            if isinstance(bank, ExpertBank):
                assert bank.announcer is None
        torch.testing.assert_close(model(x), ref, rtol=0, atol=0)  # same computation twice
