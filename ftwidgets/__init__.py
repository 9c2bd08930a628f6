"""ftwidgets: see and steer fine-tuning of a pretrained Keras 3 model from Jupyter.

Example:

>>> import ftwidgets as ftw
>>> ftw.PhaseConfig(phase="head", learning_rate=1e-3).epochs
10
"""

from ftwidgets._backend import ensure_jax_backend as _ensure_jax_backend

_ensure_jax_backend()

from ftwidgets._backend import device_summary  # noqa: E402
from ftwidgets.config import EarlyStoppingConfig, PhaseConfig  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "EarlyStoppingConfig",
    "PhaseConfig",
    "__version__",
    "device_summary",
]
