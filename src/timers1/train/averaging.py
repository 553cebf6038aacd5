"""An exponential moving average of the trained weights (``train.ema_decay``).

Late in a run the weights still move by the noise of each batch: in the GIFT-8 recipe the
validation loss went 1.0288 -> 1.0355 -> 1.0253 over its last 1,000 steps, at the smallest
learning rates of the cosine. An average over the last few hundred steps removes most of that
jitter for one elementwise pass over the weights per step (``torch._foreach_lerp_``).

The average has the layout of the weights it follows: one tensor per state-dict entry, a clone of
the local shard (a DTensor under FSDP/TP keeps its placements), so every rank averages its own
shard and DCP reshards the average like the weights when a run resumes at another layout. It is
a top-level ``ema`` entry of every training checkpoint (keys as in ``model``), which
``timers1.forecast.load_model(..., weights="ema")`` reads.

The decay ramps up as ``min(decay, (1 + n) / (10 + n))`` after n updates, so the average spans
about the last n / 9 steps until it reaches ``1 / (1 - decay)`` steps: the random initialisation
is forgotten at once, and a run shorter than ~9 / (1 - decay) steps averages its last ninth.
Only applied steps update it: a skipped step leaves the weights, and so the average, as they were.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

# The checkpoint entry (beside "model" and "optim") that holds the averaged weights.
CHECKPOINT_KEY = "ema"


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """The rank's own storage of a (DTensor) state-dict entry; writes to it are writes to the entry."""
    from torch.distributed.tensor import DTensor

    return tensor._local_tensor if isinstance(tensor, DTensor) else tensor


class WeightAverage:
    """The averaged weights of a model split into ``parts`` (pipeline stages held by this rank)."""

    def __init__(self, parts: list[nn.Module], decay: float):
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.updates = 0
        # State-dict entries alias the parameters (the optimizer updates them in place), so they
        # are read once. Stages share some names (the copied quantile head): each copy is
        # written on a swap, one average (the last stage's, as in model_state_dict) kept per name.
        live_by_part = [get_model_state_dict(part) for part in parts]
        live = {name: tensor for state in live_by_part for name, tensor in state.items()}
        with torch.no_grad():
            self.averaged = {name: tensor.detach().clone() for name, tensor in live.items()}
        # Local storage, listed once: what update() lerps and what a swap copies, per part.
        self._averaged_local = [_local(self.averaged[name]) for name in live]
        self._live_local = [_local(tensor) for tensor in live.values()]
        self._swaps = [([_local(tensor) for tensor in state.values()],
                        [_local(self.averaged[name]) for name in state]) for state in live_by_part]

    def current_decay(self) -> float:
        return min(self.decay, (1.0 + self.updates) / (10.0 + self.updates))

    @torch.no_grad()
    def update(self) -> None:
        """Move the average towards the weights after an applied step."""
        torch._foreach_lerp_(self._averaged_local, self._live_local, 1.0 - self.current_decay())
        self.updates += 1

    @torch.no_grad()
    def reset(self) -> None:
        """Start the average at the current weights (a resumed run whose checkpoint holds none)."""
        torch._foreach_copy_(self._averaged_local, self._live_local)
        self.updates = 0

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The average as a model state dict (the keys and layout of ``model`` in a checkpoint);
        a checkpoint load writes into these tensors."""
        return self.averaged

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """The model runs with the averaged weights inside the block, its own ones again after
        (in place: compiled graphs and optimizer state keep referring to the same tensors)."""
        with torch.no_grad():
            kept = [[tensor.clone() for tensor in live] for live, _ in self._swaps]
            for live, averaged in self._swaps:
                torch._foreach_copy_(live, averaged)
        try:
            yield
        finally:
            with torch.no_grad():
                for (live, _), own in zip(self._swaps, kept):
                    torch._foreach_copy_(live, own)
