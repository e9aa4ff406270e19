"""Model skeletons, made before the pause: SGLang's model for each world this rank may
serve in, its parameters on the meta device (no memory), so that a reshape into that
world adopts the moved shards into it instead of constructing the model in the pause
(the construction is 6.5-10 ms of a 20-50 ms pause for the tiny model on CPU, and grows
with the layer count).

- At launch, `build_all` makes one for every prepared world this rank belongs to but
  the live one, under that world's groups (`enter`), as SGLang's loader constructs a
  model (`model_state.build_skeleton`); only the model, no worker: SGLang's worker and
  runner, and the process-wide state they set, are still made in the pause.
- A reshape takes its new world's skeleton (`take`); the model a committed reshape
  leaves becomes its world's skeleton again (`keep`: its released parameters back on
  meta), so every later visit finds one. A rollback builds the old model afresh and
  drops the skeleton it took.

A skeleton holds its model's buffers (the rotary tables): on a GPU, device memory
outside the launch budget, small beside the weights (untested).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from .model_state import build_skeleton, to_meta
from .worlds import WorldKey, Worlds, enter, members


@dataclass
class Skeletons:
    """This process's skeletons, by world."""

    models: dict[WorldKey, torch.nn.Module] = field(default_factory=dict)

    def take(self, key: WorldKey) -> torch.nn.Module | None:
        return self.models.pop(key, None)

    def keep(self, key: WorldKey, model: torch.nn.Module, shapes: dict,
             dtype: torch.dtype) -> None:
        self.models[key] = to_meta(model, shapes, dtype)


def build_all(sched: Any, worlds: Worlds, skeletons: Skeletons, launch_rank: int,
              live: WorldKey, device: str) -> float:
    """A skeleton for every prepared world `launch_rank` belongs to but `live`, each
    under its own world; then `live` serves again. Returns the seconds it took."""
    t0 = time.perf_counter()
    runner = sched.tp_worker.model_runner
    for key in sorted(worlds.worlds):
        if key == live or key in skeletons.models or launch_rank not in members(key):
            continue
        enter(sched, worlds, key)
        skeletons.models[key] = build_skeleton(runner.model_config, runner.load_config,
                                               device)
    enter(sched, worlds, live)
    return time.perf_counter() - t0
