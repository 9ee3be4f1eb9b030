"""Model registry: ``@register_model`` on variant factories, ``create_model`` by name.

A factory is a function ``factory(scale: int = 4, *, <hyperparameter>=<default>, ...) -> nn.Module``
whose keyword parameters are exactly the overrides it accepts. :func:`create_model` checks the
name, the scale and the override names before calling it, then records the fully resolved
arguments on the model as ``model.model_config`` (``name``, ``scale`` and every hyperparameter,
defaults included), so ``create_model(**model.model_config)`` rebuilds the same architecture even
if a variant's defaults change later.
"""

from __future__ import annotations

import inspect
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from torch import nn

__all__ = ["create_model", "list_models", "register_model", "supported_scales"]

F = TypeVar("F", bound=Callable[..., nn.Module])


@dataclass(frozen=True)
class _Entry:
    factory: Callable[..., nn.Module]
    scales: tuple[int, ...]
    signature: inspect.Signature

    @property
    def override_names(self) -> list[str]:
        return [p for p in self.signature.parameters if p != "scale"]


_REGISTRY: dict[str, _Entry] = {}


def register_model(name: str, *, scales: tuple[int, ...] = (2, 3, 4)) -> Callable[[F], F]:
    """Register a model factory under ``name``; ``scales`` lists the upscaling factors it builds.

    The factory must take ``scale`` plus keyword-only hyperparameters with defaults (no ``*args``
    or ``**kwargs``: the signature is what :func:`create_model` validates overrides against).
    """

    def decorator(factory: F) -> F:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        sig = inspect.signature(factory)
        if "scale" not in sig.parameters:
            raise TypeError(f"factory for {name!r} must take a 'scale' argument")
        for p in sig.parameters.values():
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or (
                p.name != "scale" and p.default is p.empty
            ):
                raise TypeError(
                    f"factory for {name!r}: every hyperparameter needs a default and *args/"
                    f"**kwargs are not allowed (offending parameter {p.name!r})"
                )
        _REGISTRY[name] = _Entry(factory=factory, scales=tuple(scales), signature=sig)
        return factory

    return decorator


def list_models() -> list[str]:
    """Names of all registered models, sorted."""
    return sorted(_REGISTRY)


def _entry(name: str) -> _Entry:
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown model {name!r}; available models: {', '.join(list_models())}"
        ) from None


def supported_scales(name: str) -> tuple[int, ...]:
    """The upscaling factors model ``name`` can be built for, e.g. ``(2, 3, 4)``."""
    return _entry(name).scales


def create_model(name: str, scale: int = 4, **overrides: Any) -> nn.Module:
    """Build a registered float SR model.

    Args:
        name: a name from :func:`list_models` (e.g. ``"edsr_baseline"``).
        scale: upscaling factor; must be one of :func:`supported_scales` for ``name``.
        **overrides: architecture hyperparameters (e.g. ``n_resblocks=4, n_feats=32`` for EDSR,
            ``G0``/``D``/``C``/``G`` for RDN); unknown names are rejected.

    Returns:
        The model (freshly initialised, train mode, CPU) with ``model.model_config`` set to
        ``{"name": name, "scale": scale, **all_hyperparameters}``.

    Raises:
        ValueError: unknown model name, unsupported scale, or an override the model does not take.
    """
    entry = _entry(name)
    if isinstance(scale, numbers.Integral) and not isinstance(scale, bool):
        scale = int(scale)  # numpy / torch integers from configs and CLIs
    if isinstance(scale, bool) or not isinstance(scale, int) or scale not in entry.scales:
        allowed = ", ".join(str(s) for s in entry.scales)
        raise ValueError(f"{name} does not support scale {scale!r}; allowed scales: {allowed}")
    unknown = sorted(set(overrides) - set(entry.override_names))
    if unknown:
        raise ValueError(
            f"{name} has no hyperparameter {', '.join(repr(u) for u in unknown)}; "
            f"allowed overrides: {', '.join(entry.override_names)}"
        )
    bound = entry.signature.bind(scale=scale, **overrides)
    bound.apply_defaults()
    model = entry.factory(*bound.args, **bound.kwargs)
    model.model_config = {"name": name, **bound.arguments}
    return model
