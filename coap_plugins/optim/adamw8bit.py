"""CoapAdamW8bit: CoapAdamW with its moments stored blockwise 8-bit."""

from __future__ import annotations

from ._storage import Blockwise8bitStorage
from .adamw import CoapAdamW

__all__ = ["CoapAdamW8bit"]


class CoapAdamW8bit(CoapAdamW):
    """:class:`~coap_plugins.CoapAdamW` whose moments are kept in 8 bits.

    Same arguments, projectors, schedule and telemetry; only the storage differs: every moment of
    at least 4096 elements (projected cores and full-rank fallbacks alike) is held as uint8 codes
    of bitsandbytes' blockwise dynamic format (256-element blocks, one fp32 absmax each), smaller
    ones in fp32.  The step decodes, does its math in fp32 and encodes.  Needs bitsandbytes
    (``pip install 'coap-plugins[8bit]'``) for the code maps and CUDA kernels.

    Example:
        >>> opt = CoapAdamW8bit(model.parameters(), lr=1e-3, rank_ratio_conv=4)  # doctest: +SKIP
    """

    storage_class = Blockwise8bitStorage
