"""How moments are kept in ``optimizer.state``: fp32 tensors, or blockwise 8-bit codes.

The optimizers read a moment with :meth:`MomentStorage.load` (an fp32 tensor to do math on) and
write it back with :meth:`MomentStorage.store`.  For fp32 storage ``load`` returns the state tensor
itself, so in-place math updates it and ``store`` has nothing to do; the 8-bit storage decodes on
load and encodes on store.  Either way the state holds tensors only.
"""

from __future__ import annotations

import math
from collections.abc import Collection

import torch

from ._quant import MIN_8BIT_NUMEL, codec, n_blocks

__all__ = ["Blockwise8bitStorage", "MomentStorage"]


class MomentStorage:
    """fp32 moments, one tensor per key.

    Args:
        nonnegative: the moment keys whose values are never negative (second moments); the
            optimizer class says which (:attr:`CoapOptimizer.nonnegative_moments`).  A storage
            that encodes values may use it to pick its code map; fp32 storage ignores it.
    """

    def __init__(self, nonnegative: Collection[str] = ()) -> None:
        self.nonnegative = frozenset(nonnegative)

    def allocate(
        self, state: dict, key: str, shape: tuple[int, ...], device: torch.device, whole: tuple[int, ...] | None = None
    ) -> None:
        """Zeros for moment ``key`` of ``shape``; ``whole`` is the whole tensor's shape when this
        is a shard of it (FSDP2)."""
        state[key] = torch.zeros(shape, dtype=torch.float32, device=device)

    def load(self, state: dict, key: str) -> torch.Tensor:
        return state[key]

    def store(self, state: dict, key: str, value: torch.Tensor) -> None:
        if value is not state[key]:
            state[key] = value

    def state_shapes(self, key: str, shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
        return {key: shape}


class Blockwise8bitStorage(MomentStorage):
    """Moments of at least 4096 elements as uint8 codes (``state[key]``, the moment's shape) plus
    one fp32 absmax per 256-element block (``state[key + "_absmax"]``); smaller ones stay fp32.

    Moments the optimizer declares non-negative (its second moments) use bitsandbytes' unsigned
    dynamic code map, every other moment the signed one.  The code maps are shared constants,
    not state.
    """

    def __init__(self, nonnegative: Collection[str] = ()) -> None:
        super().__init__(nonnegative)
        self._codecs = {True: codec(True), False: codec(False)}

    def _signed(self, key: str) -> bool:
        return key not in self.nonnegative

    def allocate(
        self, state: dict, key: str, shape: tuple[int, ...], device: torch.device, whole: tuple[int, ...] | None = None
    ) -> None:
        numel = math.prod(shape)
        if math.prod(shape if whole is None else whole) < MIN_8BIT_NUMEL:  # decided by the whole tensor
            super().allocate(state, key, shape, device)
            return
        state[key] = torch.zeros(shape, dtype=torch.uint8, device=device)
        state[key + "_absmax"] = torch.zeros(n_blocks(numel), dtype=torch.float32, device=device)

    def load(self, state: dict, key: str) -> torch.Tensor:
        absmax = state.get(key + "_absmax")
        if absmax is None:
            return state[key]
        return self._codecs[self._signed(key)].decode(state[key], absmax)

    def store(self, state: dict, key: str, value: torch.Tensor) -> None:
        absmax = state.get(key + "_absmax")
        if absmax is None:
            super().store(state, key, value)
            return
        self._codecs[self._signed(key)].encode(value, state[key], absmax)

    def state_shapes(self, key: str, shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
        numel = math.prod(shape)
        if numel < MIN_8BIT_NUMEL:
            return {key: shape}
        return {key: shape, key + "_absmax": (n_blocks(numel),)}
