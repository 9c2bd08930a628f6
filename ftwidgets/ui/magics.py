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
from ftwidgets.ui.magic_names import check_model, keras_object, resolve
from ftwidgets.ui.view import SessionView

__all__ = ["USAGE", "FineTuneMagics", "load_ipython_extension", "session_status"]

USAGE = """\
ftwidgets magics (after %load_ext ftwidgets):

  %finetune MODEL --train X Y [--val XV YV | --validation-split F]
            [--loss LOSS] [--metrics M [M ...]] [--epochs N] [--batch-size N] [--as NAME]
            [--lora-rank N] [--fine-tune EPOCHS [--freeze-epochs N] [--base-lr R]
            [--lr-mult M]] [--run-dir PATH]
  %finetune --resume PATH --train X Y [--val XV YV] [MODEL] [options as above]
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
      --run-dir keeps the whole run in PATH (run_dir=): the model, kept epochs,
      history and notes, written as it trains. After a restart, --resume PATH
      carries that run on (FineTunePanel.resume): the panel shows the whole run
      and its next phase continues the epoch count. The data is not saved: pass
      --train (and --val) again. Options given replace the run's own; --epochs
      and --batch-size start as its last phase's.

  %ftstatus
      One line per live fine-tuning session: state, phase, epoch, learning
      rate, best epoch and run directory. Handy when the panel's cell has
      scrolled away.
"""

DEFAULT_PANEL_NAME = "_ftpanel"
# Names IPython puts in the namespace itself (output history, input history).
_HIDDEN_NAMES = frozenset({"In", "Out", "exit", "quit", "get_ipython"})
_HISTORY_NAME = re.compile(r"^(_+|_\d+|_i+|_i\d+|_ih|_oh|_dh|__\w+__)$")


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
    settings: dict[str, Any] = {"batch_size": panel.batch_size.value}
    if args.lora_rank:
        settings["lora_rank"] = args.lora_rank
    try:
        panel.session.fine_tune(args.fine_tune, wait=False, **recipe, **settings)
    except (ValueError, RuntimeError) as exc:
        panel.close()
        raise UsageError(f"%finetune: {_one_line(exc)}") from None


def _resume_settings(args: Any, model: Any, loss: Any, metrics: Any) -> dict[str, Any]:
    """The settings ``--resume`` passes on: only those the line gave, so the run's own stay."""
    given = {
        "model": model,
        "loss": loss,
        "metrics": None if args.metrics is None else metrics,
        "validation_split": args.validation_split or None,
        "name": args.name,
        "base": args.base,
    }
    return {key: value for key, value in given.items() if value is not None}


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
        nargs="?",
        help="name of a model: from ftwidgets.build_transfer_model, a KerasHub task model, "
        "or any model with --base (with --resume, only to replace the run's own)",
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
    @argument("--epochs", type=int, help="initial epochs per phase (30; --resume: the run's)")
    @argument("--batch-size", type=int, help="initial batch size (16; --resume: the run's)")
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
    @argument("--run-dir", metavar="PATH", help="keep the whole run in PATH, to resume it")
    @argument("--resume", metavar="PATH", help="carry on the run in the run directory PATH")
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
        if args.resume is None and args.model is None:
            raise UsageError("%finetune: name a MODEL, or --resume PATH. Received: " + repr(line))
        if args.resume is not None and args.run_dir is not None:
            raise UsageError(
                "%finetune: a resumed run goes on writing its own directory; drop --run-dir. "
                f"Received: --run-dir {args.run_dir}"
            )
        for option, value in (("--epochs", args.epochs), ("--batch-size", args.batch_size)):
            if value is not None and value < 1:
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
        model = None
        if args.model is not None:
            model = check_model(resolve(namespace, args.model, "MODEL"), args.model, args.base)
        train = tuple(resolve(namespace, token, "--train") for token in args.train)
        validation = (
            None
            if args.val is None
            else tuple(resolve(namespace, token, "--val") for token in args.val)
        )
        loss = None if args.loss is None else keras_object(namespace, args.loss, "loss")
        if args.metrics is not None:
            metrics = [keras_object(namespace, token, "metrics") for token in args.metrics]
        else:
            metrics = None if args.loss is None else []

        from ftwidgets.ui.panel import FineTunePanel

        try:
            if args.resume is not None:
                settings = _resume_settings(args, model, loss, metrics)
                panel = FineTunePanel.resume(args.resume, train, validation, **settings)
            else:
                panel = FineTunePanel(
                    model,
                    train=train,
                    validation=validation,
                    loss=loss,
                    metrics=metrics,
                    epochs=30 if args.epochs is None else args.epochs,
                    batch_size=16 if args.batch_size is None else args.batch_size,
                    validation_split=args.validation_split,
                    name=args.name,
                    base=args.base,
                    run_dir=args.run_dir,
                )
        except (ValueError, TypeError) as exc:
            # The engine's messages already name the bad value; keep them to one line.
            raise UsageError(f"%finetune: {_one_line(exc)}") from None
        if args.resume is not None:  # the run's last phase's, unless given
            for control, value in (
                (panel.epochs, args.epochs),
                (panel.batch_size, args.batch_size),
            ):
                if value is not None:
                    control.value = value
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
