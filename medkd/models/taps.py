"""Feature taps: read intermediate features of any network by module name, no rewriting.

torchdistill-style forward hooks keyed by the names of :meth:`torch.nn.Module.named_modules`,
so that the unmodified MONAI networks of :mod:`medkd.models.registry` expose their encoder,
bottleneck and decoder features to distillation losses.

Example::

    from medkd.models import FeatureTaps, create, discover_stages

    teacher = create("unet", 2, 1, 4)
    student = create("unet", 2, 1, 4, preset="student")
    stages = discover_stages(teacher, spatial_dims=2, in_channels=1)
    names = stages["encoder"] + stages["bottleneck"] + stages["decoder"]
    with FeatureTaps(teacher, names, detach=True) as t_taps, FeatureTaps(student, names) as s_taps:
        teacher(x), student(x)
        pairs = list(zip(s_taps.get(), t_taps.get()))   # same stage, different widths

Which names to tap: :mod:`medkd.models.stages` finds the encoder/bottleneck/decoder stages
(:func:`~medkd.models.stages.discover_stages`), :mod:`medkd.models.tracing` lists every tappable
module (:func:`~medkd.models.tracing.list_tappable`) and :mod:`medkd.models.inspection` renders
both (``medkd inspect-model NAME``).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator, Sequence
from types import TracebackType
from typing import Any

import torch.nn as nn
from torch import Tensor
from torch.utils.hooks import RemovableHandle

__all__ = ["FeatureTaps", "TapNotFoundError"]

INSPECT_HINT = "Run `medkd inspect-model NAME` (or medkd.models.list_tappable) to list tappable modules."


class TapNotFoundError(KeyError):
    """A requested module name does not exist in the model (a :class:`KeyError`)."""

    def __str__(self) -> str:  # KeyError would show the repr of the message (escaped, quoted)
        return str(self.args[0]) if self.args else ""


def first_tensor(value: Any) -> Tensor | None:
    """``value`` itself if a tensor, else the first tensor of a tuple/list (or dict values), else ``None``."""
    if isinstance(value, Tensor):
        return value
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (tuple, list)):
        for item in value:
            if isinstance(item, Tensor):
                return item
    return None


def module_table(model: nn.Module) -> dict[str, nn.Module]:
    """Every valid dotted path (shared modules under all their names), root as ``""``."""
    return dict(model.named_modules(remove_duplicate=False))


def unknown_name_error(model: nn.Module, name: str) -> TapNotFoundError:
    candidates = [n for n, _ in model.named_modules() if n]
    close = difflib.get_close_matches(name, candidates, n=5, cutoff=0.5)
    if not close:  # e.g. a missing prefix such as "module." or a dropped ".submodule"
        close = [n for n in candidates if n.endswith(name) or name.endswith(n)][:5]
    hint = f" Did you mean {close}?" if close else ""
    return TapNotFoundError(
        f"{type(model).__name__} has no module named {name!r}.{hint} {INSPECT_HINT}"
    )


class FeatureTaps:
    """Forward hooks on modules named by ``model.named_modules()`` names; captures their outputs.

    Args:
        model: the root module whose forward passes are observed.
        names: dotted module names (as printed by ``model.named_modules()`` or
            ``medkd inspect-model``); ``""`` taps the model output itself.
        detach: store ``output.detach()`` (e.g. for a frozen teacher). With ``detach=False``
            the captured tensors stay in the autograd graph, so a loss on them backpropagates
            into the parameters that produced them.

    After each forward of ``model``, :attr:`features` maps every tapped name to the output of
    that module. The dict is replaced by a fresh one at the start of every forward of the root
    model (a forward pre-hook), so features never leak from one step into the next, and a dict
    obtained earlier keeps the features of its own step. Output conventions:

    * a module returning a tuple/list (or dict) is tapped at its first tensor;
    * a module called several times in one forward keeps the output of its last call;
    * a module returning no tensor is not recorded (:meth:`get` then raises).

    Use as a context manager, or call :meth:`remove` to detach every hook.

    Raises:
        TapNotFoundError: (a ``KeyError``) an unknown name; the message lists close matches.
        ValueError: empty or duplicated names.
    """

    def __init__(self, model: nn.Module, names: Sequence[str], detach: bool = False) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}.")
        if isinstance(names, str):
            names = [names]
        names = list(names)
        if not names:
            raise ValueError("FeatureTaps needs at least one module name.")
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"Module names given more than once: {dupes}.")
        table = module_table(model)
        for name in names:
            if not isinstance(name, str):
                raise TypeError(f"Module names must be strings, got {name!r}.")
            if name not in table:
                raise unknown_name_error(model, name)
        self.model = model
        self.names: list[str] = names
        self.detach = bool(detach)
        self.features: dict[str, Tensor] = {}
        self._handles: list[RemovableHandle] = [model.register_forward_pre_hook(self._reset)]
        for name in names:
            self._handles.append(table[name].register_forward_hook(self._make_hook(name)))

    def _reset(self, module: nn.Module, args: Any) -> None:
        self.features = {}

    def _make_hook(self, name: str):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            tensor = first_tensor(output)
            if tensor is not None:
                self.features[name] = tensor.detach() if self.detach else tensor

        return hook

    @property
    def active(self) -> bool:
        """``False`` once :meth:`remove` has been called."""
        return bool(self._handles)

    def get(self, names: Sequence[str] | None = None) -> list[Tensor]:
        """Captured features of the last forward, in the order of ``names`` (default: all taps).

        Raises:
            KeyError: a name that is not tapped by this object.
            RuntimeError: a tap that did not fire during the last forward (or no forward yet).
        """
        if isinstance(names, str):
            names = [names]
        wanted = self.names if names is None else list(names)
        unknown = [n for n in wanted if n not in self.names]
        if unknown:
            raise TapNotFoundError(f"Not tapped: {unknown}; tapped modules are {self.names}.")
        missing = [n for n in wanted if n not in self.features]
        if missing:
            state = "" if self.active else " The hooks were removed."
            raise RuntimeError(
                f"Taps {missing} did not capture a tensor in the last forward of "
                f"{type(self.model).__name__}: run a forward pass first; the module may be unused in "
                f"this mode or return no tensor.{state}"
            )
        return [self.features[n] for n in wanted]

    def remove(self) -> None:
        """Remove every hook (idempotent); :attr:`features` keeps the last capture."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> FeatureTaps:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.remove()

    def __len__(self) -> int:
        return len(self.names)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __repr__(self) -> str:
        return f"FeatureTaps({type(self.model).__name__}, names={self.names}, detach={self.detach})"
