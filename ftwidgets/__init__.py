"""ftwidgets: see and steer fine-tuning of a pretrained Keras 3 model from Jupyter.

Example:

>>> import ftwidgets as ftw
>>> ftw.PhaseConfig(phase="head", learning_rate=1e-3).epochs
10
"""

from ftwidgets._backend import ensure_jax_backend as _ensure_jax_backend

_ensure_jax_backend()

from ftwidgets import demo  # noqa: E402
from ftwidgets._backend import device_summary  # noqa: E402
from ftwidgets.advice.autopilot import Autopilot  # noqa: E402
from ftwidgets.advice.exercises import (  # noqa: E402
    Exercise,
    ExerciseResult,
    NoOverfitting,
    PhaseDone,
    Reach,
    WithinEpochs,
)

# `ftw.transfer.unfreeze_units(model)` and friends, as the walkthroughs and README use them.
from ftwidgets.engine import transfer as transfer  # noqa: E402
from ftwidgets.engine.compile_cache import (  # noqa: E402
    compilation_cache_dir,
    disable_compilation_cache,
    enable_compilation_cache,
)
from ftwidgets.engine.compile_cache import configure_from_environment as _configure_cache  # noqa: E402
from ftwidgets.engine.config import EarlyStoppingConfig, PhaseConfig  # noqa: E402
from ftwidgets.engine.events import Best, EpochRecord, Failure  # noqa: E402
from ftwidgets.engine.history import Branch, History  # noqa: E402
from ftwidgets.engine.registry import live_sessions, watch_sessions  # noqa: E402
from ftwidgets.engine.run_reader import RunDamagedWarning, RunInfo, runs  # noqa: E402
from ftwidgets.engine.session import FineTuneSession  # noqa: E402
from ftwidgets.engine.transfer import (  # noqa: E402
    build_transfer_model,
    freeze_map,
    load_lora_weights,
    unfreeze,
)

__version__ = "0.1.0"

_configure_cache()


def _coach_the_session(session: FineTuneSession, alive: bool) -> None:
    # The coach listens to the session's events; the session knows nothing of its rules.
    if alive:
        from ftwidgets.advice.coach import Coach

        session.coach = Coach(enabled=session._coach_on).listen(session)


def _serve_the_lab_extension(session: FineTuneSession, alive: bool) -> None:
    # In a kernel, the first session starts the bridge to the JupyterLab extension.
    if alive:
        from ftwidgets.frontend import comms

        comms.bridge()


watch_sessions(_coach_the_session)
watch_sessions(_serve_the_lab_extension)


def __getattr__(name: str):
    # The view layer loads ipywidgets and bqplot; scripts that only train never pay for it.
    if name == "FineTunePanel":
        from ftwidgets.ui.panel import FineTunePanel

        return FineTunePanel
    if name == "TrainingCharts":
        from ftwidgets.ui.charts import TrainingCharts

        return TrainingCharts
    if name == "RunComparison":
        from ftwidgets.ui.compare import RunComparison

        return RunComparison
    raise AttributeError(f"module 'ftwidgets' has no attribute {name!r}")


def load_ipython_extension(ipython) -> None:
    """Called by ``%load_ext ftwidgets``: registers ``%finetune`` and ``%ftstatus``."""
    from ftwidgets.ui.magics import load_ipython_extension as load

    load(ipython)


def _jupyter_labextension_paths() -> list[dict[str, str]]:
    """Where the built JupyterLab extension lies (``jupyter labextension develop``)."""
    return [{"src": "labextension", "dest": "ftwidgets"}]


__all__ = [
    "Autopilot",
    "Best",
    "Branch",
    "EarlyStoppingConfig",
    "EpochRecord",
    "Exercise",
    "ExerciseResult",
    "Failure",
    "FineTunePanel",
    "FineTuneSession",
    "History",
    "NoOverfitting",
    "PhaseConfig",
    "PhaseDone",
    "Reach",
    "RunComparison",
    "RunDamagedWarning",
    "RunInfo",
    "TrainingCharts",
    "WithinEpochs",
    "__version__",
    "build_transfer_model",
    "compilation_cache_dir",
    "demo",
    "device_summary",
    "disable_compilation_cache",
    "enable_compilation_cache",
    "freeze_map",
    "live_sessions",
    "load_lora_weights",
    "runs",
    "unfreeze",
]
