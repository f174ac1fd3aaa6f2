"""How every ``medkd`` command ends on an error: one line naming the file and the cause, and an exit code.

Expected failures (a bad dataset, config, ``--set`` or checkpoint; a file that is missing,
unreadable or unwritable; a full disk; a run folder that holds a run or is in use) print
``error: <message>`` on stderr and exit with code 1. A training run stopped by SIGTERM or SIGINT
after writing its checkpoint exits with 128 + the signal's number (143, 130), as a shell reports
a process ended by that signal. Anything else is a bug and keeps its traceback;
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


def _expected_errors() -> tuple[type[BaseException], ...]:
    import yaml

    from medkd.config import ConfigError
    from medkd.data.dataset import DatasetError
    from medkd.data.io import ImageReadError
    from medkd.engine.preemption import TrainingInterrupted
    from medkd.models.taps import TapNotFoundError
    from medkd.storage import CheckpointError

    return (ConfigError, DatasetError, ImageReadError, CheckpointError, OSError, ValueError, FloatingPointError,
            yaml.YAMLError, TapNotFoundError, TrainingInterrupted)


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


def guard(func: Callable[..., Any], console: Console) -> Callable[..., Any]:
    """``func`` that reports an expected error on ``console`` and exits (see the module doc)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            with warnings.catch_warnings():
                if not os.environ.get("MEDKD_DEBUG"):  # third-party deprecations are not the user's to act on
                    for category in (FutureWarning, DeprecationWarning):
                        warnings.filterwarnings("ignore", category=category)
                return func(*args, **kwargs)
        except _expected_errors() as err:
            if os.environ.get("MEDKD_DEBUG"):
                raise
            console.print(f"[bold red]error:[/] {escape(describe(err))}", highlight=False, soft_wrap=True)
            raise typer.Exit(exit_code(err)) from None

    return wrapper


def guard_commands(app: typer.Typer, console: Console) -> None:
    """Wrap the callback of every command registered on ``app`` with :func:`guard` (call once)."""
    for command in app.registered_commands:
        if not getattr(command.callback, "medkd_guarded", False):
            command.callback = guard(command.callback, console)
            command.callback.medkd_guarded = True
