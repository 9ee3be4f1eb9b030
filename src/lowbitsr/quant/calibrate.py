"""The explicit calibration step of a freshly quantized model (docs/methods.md §1.3, §1.4, §1.8).

``calibrate(model, batches)`` runs forward passes only — no optimizer, no weight change, BN layers
in eval mode, everything under ``torch.no_grad()`` — and dispatches on the model's config type:

- **DDTB** (a) dynamic-intensity pass over all batches with every quantizer (activations and
  weights) off, recording each activation quantizer's input max and min — per sample by default,
  per batch in ``compat="official"``; intensity = ``var(max) + var(min)`` (population); the top
  ``int(L * dynamic_ratio)`` quantizers get a fresh :class:`~lowbitsr.quant.layers.DynamicGate`
  (ties keep forward order). (b) bound initialisation on the first batch, quantizers on, gates
  not run: each quantizer sets ``lower``/``upper`` to the ``(100-M)``-th/``M``-th percentile of
  its input and quantizes with them before the next layer sees its output (one forward pass in
  execution order). ``compat="official"`` at 3/4 bits instead resets the bounds to ``±10``.
  Gates are left *not applied* (the first training stage); call
  :func:`~lowbitsr.quant.apply.set_gates_applied` ``(model, True)`` for the second stage.
- **PAMS**: every ``alpha`` = EMA (decay ``ema_decay``, the first batch initialises it) of the
  batch mean of per-sample ``max|x|`` of its input, while the input is quantized *unclipped* with
  the current ``alpha`` (the first PAMS epoch, without its weight updates).

Calling it again recalibrates from scratch (DDTB gates are re-chosen and re-created).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from .apply import config_from_dict, quantized_convs, quantizers
from .ddtb import DDTBConfig, resolved_percentile, resolved_ratio
from .layers import DDTB_INIT_BOUND, DDTBActQuant, PAMSActQuant, architecture_of
from .pams import PAMSConfig

__all__ = ["attach_gates", "calibrate", "gated_layer_names"]


@contextlib.contextmanager
def _frozen(model: nn.Module) -> Iterator[None]:
    """Eval mode (BN uses running stats and does not update them) + no_grad; restores every
    module's own training flag afterwards (modules created meanwhile follow their parent)."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, mode in modes.items():
            m.training = mode  # per module: a recursive train() would overwrite children
        for m in model.modules():
            if isinstance(m, DDTBActQuant) and m.gate is not None:
                m.gate.train(m.training)


def _model_device(model: nn.Module) -> torch.device:
    ref = next(model.parameters(), None)
    return ref.device if ref is not None else torch.device("cpu")


def _batches_on(model: nn.Module, batches: Iterable[Tensor]) -> Iterator[Tensor]:
    device = _model_device(model)
    for b in batches:
        if not isinstance(b, Tensor) or b.dim() != 4:
            raise TypeError(
                "calibrate: batches must yield N×C×H×W LR tensors (as the model's forward takes); "
                f"got {type(b).__name__}{tuple(b.shape) if isinstance(b, Tensor) else ''}"
            )
        yield b.to(device)


def _no_batches() -> ValueError:
    return ValueError("calibrate: got no batches; pass at least one N×C×H×W LR batch")


def _calibrate_ddtb(model: nn.Module, batches: Iterable[Tensor], cfg: DDTBConfig) -> dict:
    arch = architecture_of(model)
    ratio = resolved_ratio(cfg, arch)
    quants: list[tuple[str, DDTBActQuant]] = [
        (n, q) for n, q in quantizers(model) if isinstance(q, DDTBActQuant)
    ]
    convs = [c for _, c in quantized_convs(model)]
    official = cfg.compat == "official"
    try:
        with _frozen(model):
            # (a) dynamic intensity, everything in full precision
            for _, q in quants:
                q.remove_gate()
                q.reset_stats()
                q.enabled, q.recording, q.calibrating = False, True, True
            for c in convs:
                c.enabled = False
            first: Tensor | None = None
            n_batches = 0
            for b in _batches_on(model, batches):
                first = b if first is None else first
                model(b)
                n_batches += 1
            if first is None:
                raise _no_batches()
            for _, q in quants:
                q.recording = False
                q.enabled = True
            for c in convs:
                c.enabled = True

            intensity: dict[str, float] = {}
            for name, q in quants:
                value = q.intensity()
                intensity[name] = float(value) if value is not None else float("nan")
            ranked = [n for n, _ in quants if intensity[n] == intensity[n]]  # drop never-run
            ranked.sort(key=lambda n: -intensity[n])  # stable: ties keep forward order
            gated = ranked[: int(len(ranked) * ratio)]
            by_name = dict(quants)
            for name in gated:
                by_name[name].add_gate()

            # (b) bound initialisation on the first batch, in execution order
            if official and cfg.bits != 2:
                init = f"fixed ±{DDTB_INIT_BOUND:g} (official, {cfg.bits}-bit)"
                for _, q in quants:
                    q.reset_bounds()
            else:
                init = f"percentile {resolved_percentile(cfg, arch):g} on the first batch"
                for _, q in quants:
                    q.init_pending = True
                model(first)
    finally:
        for _, q in quants:
            q.enabled, q.recording, q.calibrating, q.init_pending = True, False, False, False
            q.gate_applied = False
            q.last_logits = None
        for c in convs:
            c.enabled = True
    return {
        "method": "ddtb",
        "batches": n_batches,
        "num_quantizers": len(quants),
        "dynamic_ratio": ratio,
        "num_gated": len(gated),
        "gated": gated,
        "intensity": intensity,
        "bound_init": init,
        "bounds": {n: (float(q.lower.detach()), float(q.upper.detach())) for n, q in quants},
    }


def _calibrate_pams(model: nn.Module, batches: Iterable[Tensor], cfg: PAMSConfig) -> dict:
    del cfg  # the decay lives on each quantizer
    quants: list[tuple[str, PAMSActQuant]] = [
        (n, q) for n, q in quantizers(model) if isinstance(q, PAMSActQuant)
    ]
    n_batches = 0
    try:
        with _frozen(model):
            for _, q in quants:
                q.ema_mode, q.ema_started = True, False
            for b in _batches_on(model, batches):
                model(b)
                n_batches += 1
            if n_batches == 0:
                raise _no_batches()
    finally:
        for _, q in quants:
            q.ema_mode = False
    return {
        "method": "pams",
        "batches": n_batches,
        "num_quantizers": len(quants),
        "alpha": {n: float(q.alpha.detach()) for n, q in quants},
    }


_CALIBRATORS: dict[type, Callable[[nn.Module, Iterable[Tensor], Any], dict]] = {
    DDTBConfig: _calibrate_ddtb,
    PAMSConfig: _calibrate_pams,
}


def gated_layer_names(model: nn.Module) -> list[str]:
    """Names of the DDTB quantizers that carry a dynamic gate, in forward order."""
    return [n for n, q in quantizers(model) if isinstance(q, DDTBActQuant) and q.gate is not None]


def attach_gates(model: nn.Module, names: Iterable[str]) -> None:
    """Make exactly the quantizers ``names`` gated (fresh gates; others lose theirs).

    For resuming: rebuild the structure a checkpoint was written with before loading its tensors
    (:func:`lowbitsr.models.load_weights` and ``load_state_dict`` also do this from the file's
    ``gate.*`` keys). Existing gates of listed quantizers are kept.

    Raises:
        ConfigError: a name is not a DDTB activation quantizer of ``model``.
    """
    wanted = set(names)
    quants = {n: q for n, q in quantizers(model) if isinstance(q, DDTBActQuant)}
    unknown = sorted(wanted - set(quants))
    if unknown:
        raise ConfigError(
            f"attach_gates: {unknown[0]!r} is not a DDTB activation quantizer of this model; "
            f"valid names look like {next(iter(quants), 'none (not a DDTB model)')!r}"
        )
    for name, q in quants.items():
        if name in wanted and q.gate is None:
            q.add_gate()
        elif name not in wanted and q.gate is not None:
            q.remove_gate()


def calibrate(model: nn.Module, batches: Iterable[Tensor]) -> dict[str, Any]:
    """Calibrate a model returned by :func:`~lowbitsr.quant.apply.quantize` (see module doc).

    Args:
        model: the quantized model (any device; its parameters other than the bounds/``alpha``
            and the new gates are not changed, BN running statistics included).
        batches: iterable of LR batches, N×C×H×W float tensors in the model's input range (moved
            to the model's device). Iterated once; the first batch is kept for DDTB's bound init.

    Returns:
        A JSON-able summary. DDTB: ``method``, ``batches``, ``num_quantizers``,
        ``dynamic_ratio``, ``num_gated``, ``gated`` (names, highest intensity first),
        ``intensity`` (name → float), ``bound_init``, ``bounds`` (name → (lower, upper)).
        PAMS: ``method``, ``batches``, ``num_quantizers``, ``alpha`` (name → float).

    Raises:
        ConfigError: ``model`` was not produced by ``quantize``.
        ValueError: ``batches`` is empty.
    """
    d = getattr(model, "quant_config_dict", None)
    if d is None or not quantizers(model):
        raise ConfigError(
            f"calibrate: this {type(model).__name__} is not quantized; call "
            "quantize(model, config) first"
        )
    cfg = config_from_dict(d)
    return _CALIBRATORS[type(cfg)](model, batches, cfg)
