"""coap-plugins: COAP (correlation-aware gradient projection) for PyTorch, Composer and Lightning.

Only torch is needed to import this package; the framework adapters and the training runner
import their frameworks lazily.
"""

import sys

from .optim import (
    CoapAdafactor,
    CoapAdafactor8bit,
    CoapAdamW,
    CoapAdamW8bit,
    CoapOptimizer,
    create_optimizer,
    get_optimizer_class,
    register_timm,
)
from .policy import CoapPolicy, LayerRoute
from .projection import MatrixProjector, Tucker2Projector, build_projector
from .schedule import ProjectionSchedule

__version__ = "0.1.0"

__all__ = [
    "CoapAdafactor",
    "CoapAdafactor8bit",
    "CoapAdamW",
    "CoapAdamW8bit",
    "CoapOptimizer",
    "CoapPolicy",
    "LayerRoute",
    "MatrixProjector",
    "ProjectionSchedule",
    "Tucker2Projector",
    "build_projector",
    "create_optimizer",
    "get_optimizer_class",
    "register_timm",
]

# timm users get the four names in timm's optimizer factory without an extra call; importing
# timm here would cost every user its import time, so only when it is already loaded.
if "timm.optim" in sys.modules:
    register_timm()
