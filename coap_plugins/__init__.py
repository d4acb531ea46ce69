"""coap-plugins: COAP (correlation-aware gradient projection) for PyTorch, Composer and Lightning.

Only torch is needed to import this package; the framework adapters and the training runner
import their frameworks lazily.
"""

from .driver import RefreshDriver
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
from .optim.registry import install_timm_hook
from .policy import CoapPolicy, LayerRoute
from .projection import MatrixProjector, Tucker2Projector, build_projector
from .schedule import ProjectionSchedule
from .settings import CoapSettings
from .translate import build_optimizer, rebind_lr_scheduler, translate_optimizer

__version__ = "0.1.0"

__all__ = [
    "CoapAdafactor",
    "CoapAdafactor8bit",
    "CoapAdamW",
    "CoapAdamW8bit",
    "CoapOptimizer",
    "CoapPolicy",
    "CoapSettings",
    "LayerRoute",
    "MatrixProjector",
    "ProjectionSchedule",
    "RefreshDriver",
    "Tucker2Projector",
    "build_optimizer",
    "build_projector",
    "create_optimizer",
    "get_optimizer_class",
    "rebind_lr_scheduler",
    "register_timm",
    "translate_optimizer",
]

# timm users get the four names in timm's optimizer factory without an extra call, whatever the
# import order; importing timm here would cost every user its import time, so if timm.optim is
# not loaded yet the registration runs when it is.
install_timm_hook()
