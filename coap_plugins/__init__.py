"""coap-plugins: COAP (correlation-aware gradient projection) for PyTorch, Composer and Lightning.

Only torch is needed to import this package; the framework adapters and the training runner
import their frameworks lazily.
"""

from .optim import CoapAdafactor, CoapAdamW, CoapOptimizer
from .policy import CoapPolicy, LayerRoute
from .projection import MatrixProjector, Tucker2Projector, build_projector
from .schedule import ProjectionSchedule

__version__ = "0.1.0"

__all__ = [
    "CoapAdafactor",
    "CoapAdamW",
    "CoapOptimizer",
    "CoapPolicy",
    "LayerRoute",
    "MatrixProjector",
    "ProjectionSchedule",
    "Tucker2Projector",
    "build_projector",
]
