"""COAP optimizers: CoapAdamW and CoapAdafactor on one shared base."""

from ._base import COAP_GROUP_KEYS, CoapOptimizer
from .adafactor import CoapAdafactor
from .adamw import CoapAdamW

__all__ = ["COAP_GROUP_KEYS", "CoapAdafactor", "CoapAdamW", "CoapOptimizer"]
