"""How every ``medkd`` command ends on an error: one line naming the file and the cause, and an exit code.

Expected failures (a bad dataset, config, ``--set`` or checkpoint; a file that is missing,
unreadable or unwritable; a full disk; a run folder that holds a run or is in use) print
``error: <message>`` on stderr and exit with code 1. A training run stopped by SIGTERM or SIGINT
after writing its checkpoint exits with 128 + the signal's number (143, 130), as a shell reports
a process ended by that signal. A command that needs a package of the ``train`` extra (torch, MONAI...)
on an install without it (``pip install medkd`` holds only the bundle predictor's dependencies) names
the package and the install line, exit code 1. Anything else is a bug and keeps its traceback;
``MEDKD_DEBUG=1`` shows the traceback of expected failures too.

Files are written atomically (:mod:`medkd.storage`), so a failed write leaves the previous file, or
none, and no temporary file. :func:`guard_commands` applies this to every command of the app once,
so no command needs its own handling. Third-party ``FutureWarning``/``DeprecationWarning`` (MONAI, PyTorch...)
are kept out of a command's normal output; ``MEDKD_DEBUG=1`` shows them.
"""

from __future__ import annotations

import errno
import functools
import os
import sys
import warnings
from typing import Any, Callable

import typer
from rich.console import Console
from rich.markup import escape

#: what to do about an OSError, by errno
_HINTS = {
    errno.ENOSPC: "free some space or write elsewhere",
    errno.EDQUOT: "free some space or write elsewhere",
    errno.EROFS: "choose another output folder",
    errno.EACCES: "check the permissions or choose another folder",
    errno.EPERM: "check the permissions or choose another folder",
}


#: medkd's own expected errors, as ``module:class``; a module never imported cannot have raised one, so only
#: loaded modules are looked at (a torch-free install never loads the ones that import torch)
_ERROR_CLASSES = ("medkd.config:ConfigError", "medkd.data.dataset:DatasetError", "medkd.data.io:ImageReadError",
                  "medkd.engine.preemption:TrainingInterrupted", "medkd.models.taps:TapNotFoundError",
                  "medkd.storage:CheckpointError", "yaml:YAMLError")

#: top-level modules of the `train` extra (everything but the torch-free bundle predictor)
TRAIN_MODULES = {"torch", "monai", "lightning_fabric", "matplotlib", "jinja2", "tensorboard", "onnx"}


def _expected_errors() -> tuple[type[BaseException], ...]:
    loaded = [getattr(sys.modules[module], name) for module, name in (spec.split(":") for spec in _ERROR_CLASSES)
              if module in sys.modules]
    return (*loaded, OSError, ValueError, FloatingPointError)


class MissingExtraError(RuntimeError):
    """A command needs a package of the ``train`` extra that this install lacks."""

    exit_code = 1


def missing_extra(err: ModuleNotFoundError, command: str) -> MissingExtraError | None:
    """The error to report for ``err`` when it is a ``train``-extra package (None for anything else: a bug)."""
    package = (err.name or "").split(".")[0]
    if package not in TRAIN_MODULES:
        return None
    return MissingExtraError(f"`medkd {command}` needs {package}, which this install lacks: pip install 'medkd[train]' "
                             "(a plain `pip install medkd` holds only what the bundle predictor needs)")


def describe_os_error(err: OSError) -> str:
    """``<file>: <cause> (<what to do>)`` for a failed file operation; medkd's own messages unchanged."""
    if err.filename is None or err.errno is None:  # a message medkd wrote (RunDirError...): keep it
        return str(err)
    where = str(err.filename) if err.filename2 is None else f"{err.filename} -> {err.filename2}"
    cause = err.strerror or os.strerror(err.errno)
    hint = _HINTS.get(err.errno)
    return f"{where}: {cause}" + (f" ({hint})" if hint else "")


def describe(err: BaseException) -> str:
    """The one-line (for a list of dataset problems: one block) message for an expected error."""
    if isinstance(err, OSError):
        return describe_os_error(err)
    if isinstance(err, KeyError) and err.args:  # str(KeyError) quotes its message
        return str(err.args[0])
    return str(err)


def exit_code(err: BaseException) -> int:
    """1 for an expected error; 128 + signal for a run stopped by SIGTERM/SIGINT."""
    return int(getattr(err, "exit_code", 1))


def guard(func: Callable[..., Any], console: Console, name: str | None = None) -> Callable[..., Any]:
    """``func`` (the command ``name``) that reports an expected error on ``console`` and exits (see the module
    doc); a missing package of the ``train`` extra is one of them."""
    command = name or func.__name__.removesuffix("_cmd").replace("_", "-")

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            with warnings.catch_warnings():
                if not os.environ.get("MEDKD_DEBUG"):  # third-party deprecations are not the user's to act on
                    for category in (FutureWarning, DeprecationWarning):
                        warnings.filterwarnings("ignore", category=category)
                return func(*args, **kwargs)
        except ModuleNotFoundError as err:
            missing = missing_extra(err, command)
            if missing is None or os.environ.get("MEDKD_DEBUG"):
                raise
            _report(missing, console)
        except _expected_errors() as err:
            if os.environ.get("MEDKD_DEBUG"):
                raise
            _report(err, console)

    return wrapper


def _report(err: BaseException, console: Console) -> None:
    console.print(f"[bold red]error:[/] {escape(describe(err))}", highlight=False, soft_wrap=True)
    raise typer.Exit(exit_code(err)) from None


def guard_commands(app: typer.Typer, console: Console) -> None:
    """Wrap the callback of every command registered on ``app`` with :func:`guard` (call once)."""
    for command in app.registered_commands:
        if not getattr(command.callback, "medkd_guarded", False):
            command.callback = guard(command.callback, console, command.name)
            command.callback.medkd_guarded = True
