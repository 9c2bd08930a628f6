"""IPython magics: ``%load_ext ftwidgets`` adds ``%finetune`` and ``%ftstatus``.

They work in any ipykernel frontend (JupyterLab, Notebook 7, Voila) and in a plain
IPython shell, where the panel shows as its text repr.

Example, in a notebook cell (IPython syntax, so not a doctest; ``tests/test_magics.py``
runs it on a real kernel)::

    %load_ext ftwidgets
    %finetune model --train data.x_train data.y_train --val data.x_val data.y_val
    %ftstatus
    _ftpanel: transfer_model · running · head phase · epoch 3 (3/30 of this phase) · lr 1e-3 · ...
"""

from __future__ import annotations

import keyword
import re
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring

from ftwidgets.ui.format import one_line, status_text
from ftwidgets.ui.view import SessionView

__all__ = ["USAGE", "FineTuneMagics", "load_ipython_extension", "session_status"]

USAGE = """\
ftwidgets magics (after %load_ext ftwidgets):

  %finetune MODEL --train X Y [--val XV YV | --validation-split F]
            [--loss LOSS] [--metrics M [M ...]] [--epochs N] [--batch-size N] [--as NAME]
            [--lora-rank N] [--fine-tune EPOCHS [--freeze-epochs N] [--base-lr R]
            [--lr-mult M]]
      Show a FineTunePanel for MODEL (a model from ftwidgets.build_transfer_model)
      and keep it in the namespace as _ftpanel, or as NAME with --as. --lora-rank
      sets the panel's LoRA rank (0, 2, 4, 8, 16, 32 or 64; 0 is off): its
      fine-tune phases train LoRA adapters of that rank. --fine-tune starts
      fastai's one-call recipe on the panel's session at once, without waiting
      (session.fine_tune(EPOCHS, freeze_epochs=N, base_lr=R, lr_mult=M,
      wait=False)): a head phase of N epochs (1), then EPOCHS with the whole base
      unfrozen, its rates spread from R / M (deepest) to R (the head; 2e-3, 100),
      both one-cycle. The panel shows and steers both phases.
      MODEL, X, Y, XV, YV are names in the namespace; dotted names such as
      data.x_train work too. LOSS and each metric are Keras names ("mse",
      "accuracy") or names of loss/metric objects in the namespace. Without
      --loss the loss follows the model's head (sparse or categorical
      crossentropy, binary crossentropy, or mean squared error) and the
      metrics default to accuracy (mae for regression).

  %ftstatus
      One line per live fine-tuning session: state, phase, epoch, learning
      rate and best epoch. Handy when the panel's cell has scrolled away.
"""

DEFAULT_PANEL_NAME = "_ftpanel"
# Metric names that Keras's compile() resolves from the loss, not from keras.metrics.get.
_COMPILE_METRIC_ALIASES = frozenset({"acc", "accuracy", "crossentropy", "ce"})
# Names IPython puts in the namespace itself (output history, input history).
_HIDDEN_NAMES = frozenset({"In", "Out", "exit", "quit", "get_ipython"})
_HISTORY_NAME = re.compile(r"^(_+|_\d+|_i+|_i\d+|_ih|_oh|_dh|__\w+__)$")


def _resolve(namespace: dict[str, Any], name: str, what: str) -> Any:
    """Look up ``name`` (``a`` or ``a.b.c``) in ``namespace``, without evaluating code."""
    parts = name.split(".")
    if not all(part.isidentifier() for part in parts):
        raise UsageError(
            f"%finetune: {what} must be a name in the namespace, like data or data.x_train. "
            f"Received: {what}={name!r}"
        )
    if parts[0] not in namespace:
        raise UsageError(
            f"%finetune: {what} {parts[0]!r} is not defined in the namespace. "
            f"Received: {what}={name!r}"
        )
    value = namespace[parts[0]]
    for depth, part in enumerate(parts[1:], start=1):
        try:
            value = getattr(value, part)
        except AttributeError:
            owner = ".".join(parts[:depth])
            raise UsageError(
                f"%finetune: {owner} ({type(value).__name__}) has no attribute {part!r}. "
                f"Received: {what}={name!r}"
            ) from None
    return value


def _keras_object(namespace: dict[str, Any], token: str, kind: str) -> Any:
    """A loss or metric: a namespace object if ``token`` names a callable, else a Keras name."""
    import keras

    head = token.split(".")[0]
    if head in namespace and all(part.isidentifier() for part in token.split(".")):
        value = _resolve(namespace, token, f"--{kind}")
        # A variable that happens to share a Keras name (accuracy = 0.93) is not a metric.
        if callable(value):
            return value
    if kind == "metrics" and token in _COMPILE_METRIC_ALIASES:
        return token
    getter = keras.losses.get if kind == "loss" else keras.metrics.get
    try:
        getter(token)
    except (ValueError, TypeError):
        raise UsageError(
            f"%finetune: {token!r} is neither a Keras {'loss' if kind == 'loss' else 'metric'} "
            f"name nor a callable in the namespace. Received: --{kind} {token}"
        ) from None
    return token


def _check_model(model: Any, name: str, base: str | None) -> Any:
    """Fail early, before any widget exists, if ``model`` cannot have a panel."""
    import keras

    from ftwidgets.engine import transfer

    if not isinstance(model, keras.Model):
        raise UsageError(
            "%finetune: MODEL must be a Keras model: one built with "
            "ftwidgets.build_transfer_model, a KerasHub task model, or one whose base --base "
            f"names. Received: MODEL={name} ({type(model).__name__})"
        )
    try:
        transfer.get_base(model, base)
    except ValueError as exc:
        raise UsageError(
            f"%finetune: {name}: {_one_line(exc)} Wrap your pretrained base with "
            "ftwidgets.build_transfer_model(base, num_classes=...), or name it with --base."
        ) from None
    return model


def _one_line(exc: BaseException) -> str:
    # Engine messages can quote a whole array; a magic's error stays one short line.
    return one_line(str(exc)) or type(exc).__name__


def _start_fine_tune(panel: Any, args: Any) -> None:
    """``session.fine_tune(...)`` on the panel's session, without waiting; the panel is
    closed when the recipe's settings are refused."""
    recipe = {
        name: value
        for name, value in (("freeze_epochs", args.freeze_epochs), ("base_lr", args.base_lr),
                            ("lr_mult", args.lr_mult))
        if value is not None
    }  # fmt: skip
    settings: dict[str, Any] = {"batch_size": args.batch_size}
    if args.lora_rank:
        settings["lora_rank"] = args.lora_rank
    try:
        panel.session.fine_tune(args.fine_tune, wait=False, **recipe, **settings)
    except (ValueError, RuntimeError) as exc:
        panel.close()
        raise UsageError(f"%finetune: {_one_line(exc)}") from None


def session_status(session: Any, name: str | None = None) -> str:
    """Describe a ``FineTuneSession`` in one line: state, phase, epoch, rate and best.

    Args:
        session: the session (``panel.session``).
        name: how the notebook refers to it (e.g. ``"_ftpanel"``), shown after
            the session's own name.

    Returns:
        For example ``"session-1 (_ftpanel): transfer_model · running · finetune phase ·
        epoch 33 (3/30 of this phase) · lr 1e-5 · best epoch 32 (val_loss 1.21)"``: the
        epoch is the run's, as the panel and ``restore_epoch`` count it.

    Example:

    >>> import ftwidgets as ftw
    >>> data = ftw.demo.digits_transfer(per_class=10, seed=0)
    >>> model = ftw.build_transfer_model(ftw.demo.pretrained_base(), num_classes=5)
    >>> session = ftw.FineTuneSession(
    ...     model, train=(data.x_train, data.y_train), name="digits")
    >>> session_status(session, "session")
    'digits (session): transfer_model · idle · no phase yet · best -'
    >>> session.close()
    """
    return status_text(SessionView.of(session), name)


@magics_class
class FineTuneMagics(Magics):
    """``%finetune`` and ``%ftstatus``; registered by ``load_ipython_extension``.

    Example, in IPython (``%load_ext ftwidgets`` does the same)::

        get_ipython().register_magics(FineTuneMagics)
    """

    @magic_arguments()
    @argument(
        "model",
        help="name of a model: from ftwidgets.build_transfer_model, a KerasHub task model, "
        "or any model with --base",
    )
    @argument(
        "--train", nargs=2, metavar=("X", "Y"), required=True, help="training inputs and labels"
    )
    @argument("--val", nargs=2, metavar=("XV", "YV"), help="validation inputs and labels")
    @argument(
        "--validation-split",
        type=float,
        default=0.0,
        metavar="F",
        help="hold out this fraction of the training arrays instead of --val",
    )
    @argument("--loss", help="a Keras loss name or a loss in the namespace (from the head)")
    @argument(
        "--metrics",
        nargs="+",
        metavar="M",
        help="Keras metric names or metrics in the namespace (accuracy without --loss)",
    )
    @argument("--epochs", type=int, default=30, help="initial epochs per phase (30)")
    @argument("--batch-size", type=int, default=16, help="initial batch size (16)")
    @argument(
        "--as",
        dest="as_name",
        default=DEFAULT_PANEL_NAME,
        metavar="NAME",
        help=f"namespace name for the panel ({DEFAULT_PANEL_NAME})",
    )
    @argument("--name", help="the session's name (default: session-1, session-2...)")
    @argument("--base", metavar="LAYER", help="the name of the model's base layer, if needed")
    @argument(
        "--lora-rank",
        type=int,
        metavar="N",
        help="the panel's LoRA rank for fine-tune phases (0, 2, 4, 8, 16, 32, 64; 0 is off)",
    )
    @argument("--fine-tune", type=int, metavar="EPOCHS",
              help="start session.fine_tune(EPOCHS, ...) at once, without waiting")  # fmt: skip
    @argument("--freeze-epochs", type=int, metavar="N",
              help="--fine-tune's head phase epochs (1; 0: none)")  # fmt: skip
    @argument("--base-lr", type=float, metavar="R",
              help="--fine-tune's head peak rate (2e-3)")  # fmt: skip
    @argument("--lr-mult", type=float, metavar="M",
              help="--fine-tune: the deepest unit trains M times lower (100)")  # fmt: skip
    @line_magic
    def finetune(self, line: str) -> None:
        """Show a fine-tuning control panel for a model and keep it in the namespace.

        Names are looked up in the notebook's namespace; errors are one line.
        """
        args = parse_argstring(self.finetune, line)
        namespace = self.shell.user_ns
        name = args.as_name
        if not name.isidentifier() or keyword.iskeyword(name):
            raise UsageError(f"%finetune: --as needs a Python identifier. Received: --as {name}")
        if args.val is not None and args.validation_split:
            raise UsageError(
                "%finetune: pass --val or --validation-split, not both. "
                f"Received: --validation-split {args.validation_split}"
            )
        for option, value in (("--epochs", args.epochs), ("--batch-size", args.batch_size)):
            if value < 1:
                raise UsageError(f"%finetune: {option} must be >= 1. Received: {option} {value}")
        from ftwidgets.ui.lora_control import LORA_RANKS

        if args.lora_rank is not None and args.lora_rank not in LORA_RANKS:
            raise UsageError(
                f"%finetune: --lora-rank must be one of {', '.join(map(str, LORA_RANKS))} "
                f"(0 is off). Received: --lora-rank {args.lora_rank}"
            )
        if not 0.0 <= args.validation_split < 1.0:
            raise UsageError(
                "%finetune: --validation-split must be in [0, 1). "
                f"Received: --validation-split {args.validation_split}"
            )
        if args.fine_tune is None:
            for option in ("freeze_epochs", "base_lr", "lr_mult"):
                if getattr(args, option) is not None:
                    flag = "--" + option.replace("_", "-")
                    raise UsageError(
                        f"%finetune: {flag} sets --fine-tune's recipe; add --fine-tune EPOCHS. "
                        f"Received: {flag} {getattr(args, option)}"
                    )
        model = _check_model(_resolve(namespace, args.model, "MODEL"), args.model, args.base)
        train = tuple(_resolve(namespace, token, "--train") for token in args.train)
        validation = (
            None
            if args.val is None
            else tuple(_resolve(namespace, token, "--val") for token in args.val)
        )
        loss = None if args.loss is None else _keras_object(namespace, args.loss, "loss")
        if args.metrics is not None:
            metrics = [_keras_object(namespace, token, "metrics") for token in args.metrics]
        else:
            metrics = None if args.loss is None else []

        from ftwidgets.ui.panel import FineTunePanel

        try:
            panel = FineTunePanel(
                model,
                train=train,
                validation=validation,
                loss=loss,
                metrics=metrics,
                epochs=args.epochs,
                batch_size=args.batch_size,
                validation_split=args.validation_split,
                name=args.name,
                base=args.base,
            )
        except (ValueError, TypeError) as exc:
            # The engine's messages already name the bad value; keep them to one line.
            raise UsageError(f"%finetune: {_one_line(exc)}") from None
        if args.lora_rank is not None:
            panel.lora_rank.value = args.lora_rank
        if args.fine_tune is not None:
            _start_fine_tune(panel, args)
        namespace[name] = panel

        from IPython.display import display

        display(panel)

    @line_magic
    def ftstatus(self, line: str) -> None:
        """Print one line per live fine-tuning session (state, phase, epoch, best)."""
        if line.strip():
            raise UsageError(f"%ftstatus takes no arguments. Received: {line.strip()!r}")
        from ftwidgets.engine.registry import live_sessions

        sessions = live_sessions()
        if not sessions:
            print("No live fine-tuning sessions. Start one with %finetune or FineTunePanel(...).")
            return
        names = self._names_by_session()
        for session in sessions:
            print(session_status(session, names.get(id(session))))

    def _names_by_session(self) -> dict[int, str]:
        """id(session) -> a namespace name that holds it or its panel; public names first."""
        from ftwidgets.engine.session import FineTuneSession
        from ftwidgets.ui.panel import FineTunePanel

        found: dict[int, str] = {}
        items = list(self.shell.user_ns.items())
        # Sorting on "starts with _" keeps `panel` ahead of `_ftpanel` for the same session.
        for key, value in sorted(items, key=lambda item: item[0].startswith("_")):
            # Output-history names (_, __, _7, _i3...) would only add noise.
            if key in _HIDDEN_NAMES or _HISTORY_NAME.match(key):
                continue
            if isinstance(value, FineTunePanel):
                found.setdefault(id(value.session), key)
            elif isinstance(value, FineTuneSession):
                found.setdefault(id(value), key)
        return found


def load_ipython_extension(ipython: Any) -> None:
    """Register ``%finetune`` and ``%ftstatus``; ``%load_ext ftwidgets`` calls this.

    Calling it again (``%reload_ext ftwidgets``) replaces the magics, so loading
    twice is harmless.

    Args:
        ipython: the running ``InteractiveShell``.

    Example, in IPython::

        from IPython import get_ipython
        load_ipython_extension(get_ipython())
    """
    ipython.register_magics(FineTuneMagics)
