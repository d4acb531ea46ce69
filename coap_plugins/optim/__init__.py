"""COAP optimizers: CoapAdamW and CoapAdafactor on one shared base, and their 8-bit forms."""

from ._backward import StepInBackward, step_in_backward
from ._base import COAP_GROUP_KEYS, CoapOptimizer
from .adafactor import CoapAdafactor
from .adafactor8bit import CoapAdafactor8bit
from .adamw import CoapAdamW
from .adamw8bit import CoapAdamW8bit
from .registry import OPTIMIZERS, create_optimizer, get_optimizer_class, register_timm

__all__ = [
    "COAP_GROUP_KEYS",
    "OPTIMIZERS",
    "CoapAdafactor",
    "CoapAdafactor8bit",
    "CoapAdamW",
    "CoapAdamW8bit",
    "CoapOptimizer",
    "StepInBackward",
    "create_optimizer",
    "get_optimizer_class",
    "register_timm",
    "step_in_backward",
]
