"""The time budget of a training run: parse '10m', fit epochs x steps into what is left, time a training step.

A budgeted run times one validation and a few throwaway steps, then `fit_schedule` picks the epochs and steps that
fill the budget (the cosine learning-rate schedule then ends inside it instead of being cut short).
"""

from __future__ import annotations

import copy
import time
from dataclasses import replace
from collections.abc import Callable
from typing import Any

import torch

from siamesedb.errors import InvalidInputError

def parse_duration(text: str) -> float:
    """'10m', '90s', '1.5h', '600' (seconds) -> seconds."""
    units = {"s": 1.0, "m": 60.0, "h": 3600.0}
    spec = str(text).strip().lower()
    scale = units.get(spec[-1:], None)
    number = spec[:-1] if scale else spec
    try:
        value = float(number) * (scale or 1.0)
    except ValueError:
        raise InvalidInputError(f"time budget {text!r}: give seconds or a number with s, m or h (e.g. 10m)") from None
    if not value > 0:
        raise InvalidInputError(f"time budget {text!r} must be positive")
    return value


def fit_schedule(budget_left: float, step_seconds: float, val_seconds: float, steps_per_epoch: int,
                 max_epochs: int) -> tuple[int, int]:
    """(epochs, steps per epoch) that fill `budget_left` seconds, each epoch costing its steps plus one validation.

    Whole epochs of `steps_per_epoch` up to `max_epochs`; when fewer than 3 such epochs fit, 3 shorter ones (or as
    few steps as fit, never under 1), so validation still gets to pick a best epoch.
    """
    epoch_seconds = steps_per_epoch * step_seconds + val_seconds
    epochs = int(budget_left // epoch_seconds)
    if epochs >= 3:
        return min(epochs, max_epochs), steps_per_epoch
    epochs = 3 if budget_left > 3 * (val_seconds + 10 * step_seconds) else 1
    steps = int((budget_left / epochs - val_seconds) // step_seconds)
    return epochs, max(1, min(steps, steps_per_epoch))


def time_steps(net: torch.nn.Module, optimizer: torch.optim.Optimizer, loss_module: torch.nn.Module,
               make_batches: Callable[[int], Callable[[], Any]], train_step: Callable[..., tuple[float, int]], lr: float,
               warmup: int = 2, timed: int = 6) -> float:
    """Seconds per training step, from `timed` throwaway steps after `warmup` ones; every weight, optimiser moment
    and random state is put back afterwards, so the run itself is the one its saved schedule describes.

    `make_batches(seed)` returns a function drawing one batch; `train_step(draw, generator, lr)` takes one step.
    """
    saved = (copy.deepcopy(net.state_dict()), copy.deepcopy(optimizer.state_dict()),
             copy.deepcopy(loss_module.state_dict()), torch.get_rng_state())
    draw, generator = make_batches(987_654_321), torch.Generator().manual_seed(12345)  # a seed no epoch uses
    net.train()
    for _ in range(warmup):
        train_step(draw, generator, lr)
    clock = time.perf_counter()
    for _ in range(timed):
        train_step(draw, generator, lr)
    seconds = (time.perf_counter() - clock) / timed
    net.load_state_dict(saved[0])
    optimizer.load_state_dict(saved[1])
    loss_module.load_state_dict(saved[2])
    torch.set_rng_state(saved[3])
    return seconds


def replan(config: Any, state: dict[str, Any], epoch: int, steps: int, train_seconds: float,
           val_seconds: float, left: float, timed: float | None, cap: int,
           log: Callable[[str], None]) -> tuple[Any, int]:
    """After epoch `epoch` (0-based) of a budgeted run: re-fit the epochs left to the `left` seconds at the cost
    this epoch really had (the timed steps may have promised more or less: other work, warm-up). Slower: fewer
    epochs of the same steps, or one shorter last one (>= 10 steps), or none. Faster by over a fifth: more steps
    per epoch, up to `cap`. Returns (config, total steps of the cosine schedule: the ones run + the ones planned);
    `state["steps_run"]` counts the steps run so far."""
    step_cost = max(train_seconds / max(steps, 1), 1e-9)
    planned_left, per_epoch = config.epochs - (epoch + 1), config.steps_per_epoch

    def affordable(n: int) -> int:  # steps per epoch that fit when n epochs are left
        return int((max(0.0, left) / n - val_seconds) // step_cost)

    epochs_left, new_steps = planned_left, per_epoch
    if affordable(planned_left) < per_epoch:
        epochs_left = next((n for n in range(planned_left, 0, -1) if affordable(n) >= per_epoch), 0)
        if epochs_left == 0 and affordable(1) >= 10:
            epochs_left, new_steps = 1, affordable(1)
    elif affordable(planned_left) > 1.2 * per_epoch and per_epoch < cap:
        new_steps = min(cap, affordable(planned_left))
    if (epochs_left, new_steps) != (planned_left, per_epoch):
        than = f", {step_cost:.2f} s a step against {timed:.2f} s timed" if timed else f", {step_cost:.2f} s a step"
        log(f"re-planned to the time budget: {epoch + 1 + epochs_left} epochs instead of {config.epochs}"
            + (f", {new_steps} steps each from now on instead of {per_epoch}" if new_steps != per_epoch else "")
            + f" (epoch {epoch + 1} took {train_seconds + val_seconds:.0f} s{than})")
        state.setdefault("replanned", []).append({"after_epoch": epoch + 1, "epochs": epoch + 1 + epochs_left,
                                                  "steps": new_steps, "step_seconds": round(step_cost, 4)})
    config = replace(config, epochs=epoch + 1 + epochs_left, steps_per_epoch=new_steps)
    total = state.get("steps_run", 0) + epochs_left * new_steps
    state["schedule"], state["total_steps"] = [config.epochs, new_steps], total
    return config, total
