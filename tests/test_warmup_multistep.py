"""`WarmupMultiStepLR`, the schedule of the deep CIFAR recipes: a constant warmup, then steps at milestones."""

from __future__ import annotations

import pytest
import torch

from resnet_lit.optim import WarmupMultiStepLR


def lrs(scheduler: WarmupMultiStepLR, steps: int) -> list[float]:
    optimizer = scheduler.optimizer
    seen = []
    for _ in range(steps):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return seen


def test_warmup_then_divided_by_ten_at_each_milestone() -> None:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    scheduler = WarmupMultiStepLR(optimizer, milestones=[6, 9], gamma=0.1, warmup_steps=3, warmup_factor=0.1)
    assert lrs(scheduler, 11) == pytest.approx([0.01] * 3 + [0.1] * 3 + [0.01] * 3 + [0.001] * 2)


def test_the_schedule_resumes_from_its_state_dict() -> None:
    def make() -> WarmupMultiStepLR:
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        return WarmupMultiStepLR(optimizer, milestones=[4], warmup_steps=2)

    uninterrupted = lrs(make(), 6)
    first = make()
    head = lrs(first, 3)
    resumed = make()
    resumed.load_state_dict(first.state_dict())
    resumed.optimizer.param_groups[0]["lr"] = first.optimizer.param_groups[0]["lr"]  # as the optimizer's state does
    assert head + lrs(resumed, 3) == pytest.approx(uninterrupted)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"milestones": [5, 2]}, "increasing"), ({"milestones": [2], "warmup_factor": 0.0}, "warmup_factor")],
)
def test_bad_arguments_are_named(kwargs: dict, message: str) -> None:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match=message):
        WarmupMultiStepLR(optimizer, **kwargs)
