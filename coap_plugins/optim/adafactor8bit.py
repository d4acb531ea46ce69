"""CoapAdafactor8bit: CoapAdafactor with its moments stored blockwise 8-bit."""

from __future__ import annotations

from ._storage import Blockwise8bitStorage
from .adafactor import CoapAdafactor

__all__ = ["CoapAdafactor8bit"]


class CoapAdafactor8bit(CoapAdafactor):
    """:class:`~coap_plugins.CoapAdafactor` whose moments are kept in 8 bits.

    The first moment and the factors of the second moment (when they have at least 4096
    elements) are held in bitsandbytes' blockwise dynamic 8-bit format; see
    :class:`~coap_plugins.CoapAdamW8bit`.  Needs ``pip install 'coap-plugins[8bit]'``.
    """

    storage_class = Blockwise8bitStorage
