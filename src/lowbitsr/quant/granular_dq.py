"""Granular-DQ: patch-wise, layer-invariant dynamic quantization (docs/methods.md §2).

Wang et al., "Thinking in Granularity: Dynamic Quantization for Image Super-Resolution by
Intriguing Multi-Granularity Clues", AAAI 2025 (arXiv 2409.14330).

>>> from lowbitsr.models import create_model
>>> from lowbitsr.quant.granular_dq import (
...     GranularDQConfig, calibrate_granular_dq, gdq_super_resolve, quantize_granular_dq)
>>> float_model = create_model("edsr_tiny", scale=2, n_resblocks=2, n_feats=16)
>>> qmodel = quantize_granular_dq(float_model, GranularDQConfig(entropy_thresholds=(2.8, 3.18)))
>>> calibrate_granular_dq(qmodel, lr_batch)              # doctest: +SKIP  (LSQ lazy init)
>>> sr = qmodel.eval()(lr)                                # doctest: +SKIP  forward(lr) -> sr
>>> sr, bit_map = gdq_super_resolve(qmodel, lr, scale=2)  # doctest: +SKIP  §2.4 tiles

Contents (file order): config; model wrapper and the module swap; calibration; the entropy
table (E2B thresholds from the training set); tiled inference; the training recipe.

What the swap does (:func:`quantize_granular_dq`): the body's convs (EDSR residual blocks, RDN
residual dense blocks, SRResNet residual blocks) become :class:`~.gdq_layers.GDQConv2d`; the head
conv is wrapped so that its output ``Z1`` feeds the bit controller; head, upsampler, tail and the
convs between blocks stay float (docs/methods.md §2.3). The float model's own
``forward_features`` runs unchanged inside :class:`GranularDQModel`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import itertools
import json
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from ..recipe import Recipe
from .bitops import fab
from .gdq_layers import (
    BitContext,
    EntropyToBit,
    GDQConv2d,
    GranularBitController,
    interp_quantile_curve,
    patch_entropy,
)

__all__ = [
    "EntropyTable",
    "GranularDQConfig",
    "GranularDQModel",
    "GranularDQRecipe",
    "build_entropy_table",
    "calibrate_granular_dq",
    "compute_entropy_table",
    "entropy_table_path",
    "gdq_super_resolve",
    "gdq_tile_starts",
    "load_entropy_table",
    "quantize_granular_dq",
    "save_entropy_table",
]

_GATES = ("learned", "random", "fixed")
_COMPATS = ("default", "official")
#: ATC decay: ours (docs/methods.md §2.2) and the released code's.
DEFAULT_ATC_GAMMA = 0.9997
OFFICIAL_ATC_GAMMA = 0.99997


# ============================================================================================
# Config
# ============================================================================================


def _bad(key: str, value: Any, hint: str) -> ConfigError:
    return ConfigError(f"granular_dq.{key}={value!r} is not valid: {hint}")


def _int_tuple(key: str, value: Any, length: int | None = None) -> tuple[int, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise _bad(key, value, "write a list of bit-widths, e.g. [4, 6, 8]")
    out = tuple(value)
    if not all(isinstance(b, int) and not isinstance(b, bool) and 2 <= b <= 16 for b in out):
        raise _bad(key, value, "bit-widths must be integers between 2 and 16, e.g. [4, 6, 8]")
    if list(out) != sorted(set(out)):
        raise _bad(key, value, f"list distinct bit-widths in increasing order, e.g. {sorted(out)}")
    if length is not None and len(out) != length:
        raise _bad(key, value, f"give exactly {length} bit-widths, e.g. [4, 5, 8]")
    if not out:
        raise _bad(key, value, "give at least one bit-width, e.g. [4, 6, 8]")
    return out


def _float_tuple(key: str, value: Any, length: int) -> tuple[float, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise _bad(key, value, f"write a list of {length} numbers")
    out = tuple(value)
    if len(out) != length or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in out
    ):
        raise _bad(key, value, f"write a list of {length} finite numbers")
    return tuple(float(v) for v in out)


@dataclass(frozen=True)
class GranularDQConfig:
    """Granular-DQ quantization config (docs/methods.md §2); validated on construction.

    Attributes:
        gbc_bits: GBC candidate bit-widths, increasing (paper: 4, 6, 8).
        e2b_bits: the 3 bit-widths E2B assigns to patches the GBC sent to ``max(gbc_bits)``
            (paper: 4, 5, 8), increasing.
        weight_bits: LSQ weight bit-width of every quantized conv (paper: 8).
        tau: Gumbel-softmax temperature of the learned gate.
        gate: ``"learned"`` (GBC), ``"random"`` (draws from ``random_probs``: the control at
            matched average bits) or ``"fixed"`` (every patch at ``fixed_bits``).
        fixed_bits: the bit-width of the fixed gate (one of the candidates); only for "fixed".
        random_probs: probabilities over ``gbc_bits`` for the random gate (None = uniform).
        entropy_thresholds: E2B ``(H_t1, H_t2)`` in nats; None = calibrate from the training
            data (the recipe builds the entropy table; see :func:`compute_entropy_table`).
        entropy_quantiles: the quantile levels ``(t1, t2)`` the thresholds come from.
        atc_gamma: ATC decay; None = 0.9997 (default) or 0.99997 (official).
        atc_iterations: how many training steps ATC runs (the "first epoch"); None =
            ``train.iterations // 10``.
        use_e2b: apply E2B (off = GBC only, the paper's first ablation row).
        use_atc: adapt the E2B thresholds during the first epoch.
        compat: ``"default"`` (paper intent) or ``"official"`` (released-code numerics: no GBC
            GroupNorm, no gate gradient, Gumbel noise at eval, shift unused, max-based weight
            init, official ATC (the per-patch float32 recurrence, levels rounded half up from
            their exact value), top-left-square entropy, the released LSQ ``grad_scale`` step
            form for activations and weights).
        tile: LR tile size of tiled inference (§2.4).
        tile_step: step between tiles (``<= tile``).
    """

    gbc_bits: tuple[int, ...] = (4, 6, 8)
    e2b_bits: tuple[int, ...] = (4, 5, 8)
    weight_bits: int = 8
    tau: float = 1.0
    gate: str = "learned"
    fixed_bits: int | None = None
    random_probs: tuple[float, ...] | None = None
    entropy_thresholds: tuple[float, float] | None = None
    entropy_quantiles: tuple[float, float] = (0.5, 0.9)
    atc_gamma: float | None = None
    atc_iterations: int | None = None
    use_e2b: bool = True
    use_atc: bool = True
    compat: str = "default"
    tile: int = 96
    tile_step: int = 90

    method: ClassVar[str] = "granular_dq"

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: normalise lists from YAML into tuples
        set_(self, "gbc_bits", _int_tuple("gbc_bits", self.gbc_bits))
        set_(self, "e2b_bits", _int_tuple("e2b_bits", self.e2b_bits, 3))
        if self.gate not in _GATES:
            raise _bad("gate", self.gate, f"use one of {', '.join(map(repr, _GATES))}")
        if self.compat not in _COMPATS:
            raise _bad("compat", self.compat, "use 'default' or 'official'")
        if self.use_e2b and max(self.e2b_bits) > max(self.gbc_bits):
            raise _bad(
                "e2b_bits",
                list(self.e2b_bits),
                f"E2B re-assigns the {max(self.gbc_bits)}-bit patches and must not raise them; "
                f"use bit-widths <= {max(self.gbc_bits)}, e.g. [4, 5, 8]",
            )
        if self.gate == "learned" and len(self.gbc_bits) < 2:
            raise _bad("gbc_bits", list(self.gbc_bits), "a learned gate needs >= 2 choices")
        wb = self.weight_bits
        if not isinstance(wb, int) or isinstance(wb, bool) or not 2 <= wb <= 16:
            raise _bad("weight_bits", wb, "write an integer between 2 and 16, e.g. 8")
        if isinstance(self.tau, bool) or not isinstance(self.tau, (int, float)) or self.tau <= 0:
            raise _bad("tau", self.tau, "write a positive number, e.g. 1.0")
        set_(self, "tau", float(self.tau))
        self._check_gate_options()
        self._check_entropy_options()
        for key in ("use_e2b", "use_atc"):
            if not isinstance(getattr(self, key), bool):
                raise _bad(key, getattr(self, key), "write true or false")
        for key in ("tile", "tile_step"):
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise _bad(key, v, "write a positive integer, e.g. 96 (tile) and 90 (tile_step)")
        if self.tile_step > self.tile:
            raise _bad("tile_step", self.tile_step, f"must be <= tile ({self.tile}), e.g. 90")

    def _check_gate_options(self) -> None:
        if self.gate == "fixed":
            fb = self.fixed_bits
            if fb not in self.candidates or isinstance(fb, bool):
                raise _bad(
                    "fixed_bits", fb, f"gate 'fixed' needs one of the bits {self.candidates}"
                )
        elif self.fixed_bits is not None:
            raise _bad("fixed_bits", self.fixed_bits, "only used with gate: fixed; remove it")
        if self.random_probs is not None:
            if self.gate != "random":
                raise _bad("random_probs", self.random_probs, "only used with gate: random")
            k = len(self.gbc_bits)
            probs = _float_tuple("random_probs", self.random_probs, k)
            if any(p < 0 for p in probs) or abs(sum(probs) - 1.0) > 1e-6:
                raise _bad(
                    "random_probs",
                    self.random_probs,
                    f"give {k} non-negative probabilities (one per gbc_bits entry) summing to 1",
                )
            object.__setattr__(self, "random_probs", probs)

    def _check_entropy_options(self) -> None:
        if self.entropy_thresholds is not None:
            t = _float_tuple("entropy_thresholds", self.entropy_thresholds, 2)
            if t[0] > t[1]:
                raise _bad("entropy_thresholds", self.entropy_thresholds, "need H_t1 <= H_t2")
            object.__setattr__(self, "entropy_thresholds", t)
        q = _float_tuple("entropy_quantiles", self.entropy_quantiles, 2)
        if not 0.0 <= q[0] <= q[1] <= 1.0:
            raise _bad("entropy_quantiles", self.entropy_quantiles, "need 0 <= t1 <= t2 <= 1")
        object.__setattr__(self, "entropy_quantiles", q)
        g = self.atc_gamma
        if g is not None:
            if isinstance(g, bool) or not isinstance(g, (int, float)) or not 0.0 < g < 1.0:
                raise _bad("atc_gamma", g, "write a number in (0, 1), e.g. 0.9997, or null")
            object.__setattr__(self, "atc_gamma", float(g))
        it = self.atc_iterations
        if it is not None and (not isinstance(it, int) or isinstance(it, bool) or it < 0):
            raise _bad("atc_iterations", it, "write a non-negative integer or null")

    @property
    def candidates(self) -> tuple[int, ...]:
        """Sorted union of ``gbc_bits`` and ``e2b_bits``: the bits every quantized layer holds."""
        return tuple(sorted(set(self.gbc_bits) | set(self.e2b_bits)))

    @property
    def resolved_atc_gamma(self) -> float:
        """``atc_gamma``, or the mode's default (0.9997; official 0.99997)."""
        if self.atc_gamma is not None:
            return self.atc_gamma
        return OFFICIAL_ATC_GAMMA if self.compat == "official" else DEFAULT_ATC_GAMMA

    @property
    def e2b_active(self) -> bool:
        """Whether E2B runs (it never does for the fixed gate)."""
        return self.use_e2b and self.gate != "fixed"

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML-able dict, ``method`` first; ``from_dict`` inverts it."""
        out: dict[str, Any] = {"method": self.method}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GranularDQConfig:
        """Build from a mapping (e.g. the ``quant`` section of an experiment YAML).

        A ``method`` key, if present, must be ``"granular_dq"``; unknown keys are rejected with
        the list of valid ones.
        """
        if not isinstance(data, Mapping):
            raise ConfigError(f"granular_dq config must be a mapping, got {type(data).__name__}")
        d = dict(data)
        method = d.pop("method", cls.method)
        if method != cls.method:
            raise ConfigError(
                f"granular_dq config has method={method!r}; write method: {cls.method} "
                "(or use that method's own config)"
            )
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise ConfigError(
                f"granular_dq config: unknown key(s) {', '.join(map(repr, unknown))}; "
                f"valid keys: {', '.join(names)}"
            )
        return cls(**d)


# ============================================================================================
# Model wrapper and module swap
# ============================================================================================


@dataclass(frozen=True)
class _ArchSpec:
    """Where Granular-DQ plugs into one float architecture."""

    head_attr: str  # the module whose output is Z1 (wrapped to feed the controller)
    pre_head: Callable[[nn.Module, Tensor], Tensor]  # network input -> head input
    targets: Callable[[nn.Module], list[tuple[nn.Module, str, nn.Conv2d]]]  # body convs


def _edsr_targets(net: nn.Module) -> list[tuple[nn.Module, str, nn.Conv2d]]:
    from ..models.edsr import ResBlock

    out = []
    for block in net.body:
        if isinstance(block, ResBlock):
            out += [(block.body, "0", block.body[0]), (block.body, "2", block.body[2])]
    return out


def _rdn_targets(net: nn.Module) -> list[tuple[nn.Module, str, nn.Conv2d]]:
    out: list[tuple[nn.Module, str, nn.Conv2d]] = []
    for rdb in net.RDBs:
        out += [(layer.conv, "0", layer.conv[0]) for layer in rdb.convs]
        out.append((rdb, "LFF", rdb.LFF))
    return out


def _srresnet_targets(net: nn.Module) -> list[tuple[nn.Module, str, nn.Conv2d]]:
    out = []
    for block in net.residual:
        out += [(block, "conv1", block.conv1), (block, "conv2", block.conv2)]
    return out


def _arch_spec(net: nn.Module) -> tuple[str, _ArchSpec]:
    from ..models import EDSR, RDN, SRResNet

    if isinstance(net, EDSR):
        return "edsr", _ArchSpec("head", lambda m, x: m.sub_mean(x), _edsr_targets)
    if isinstance(net, RDN):
        return "rdn", _ArchSpec("SFENet1", lambda m, x: x, _rdn_targets)
    if isinstance(net, SRResNet):
        # Z1 = the 9x9 conv output before PReLU, as the released SRResNet code feeds its gate.
        return "srresnet", _ArchSpec("conv_input", lambda m, x: x, _srresnet_targets)
    raise TypeError(
        f"Granular-DQ supports lowbitsr's EDSR, RDN and SRResNet models, got "
        f"{type(net).__name__}; build the float model with lowbitsr.create_model(...)."
    )


class _HeadTap(nn.Module):
    """The float head, then the bit controller on its output ``Z1`` (docs/methods.md §2.1).

    The controller is owned by :class:`GranularDQModel`; it is referenced here without being
    registered, so it appears once in ``state_dict`` and ``print(model)``.
    """

    def __init__(self, inner: nn.Module, ctx: BitContext, controller: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.ctx = ctx
        self.__dict__["_controller"] = controller

    def forward(self, x: Tensor) -> Tensor:
        z1 = self.inner(x)
        self.__dict__["_controller"](z1, self.ctx)
        return z1

    def extra_repr(self) -> str:
        return "output feeds the Granular-DQ bit controller"


class GranularDQModel(nn.Module):
    """A float SR model quantized with Granular-DQ (build it with :func:`quantize_granular_dq`).

    ``forward(lr) -> sr`` and ``forward_features(lr) -> (sr, feat)`` keep the float model's
    contract (``lr``: ``[N, 3, H, W]`` RGB in ``[0, rgb_range]``; ``sr``: ``[N, 3, sH, sW]``, not
    clamped). Each sample of the batch is one patch with its own bit-width, chosen from its head
    features (GBC) and its entropy (E2B) and used by every quantized layer.

    Attributes:
        net: the float architecture with its body convs swapped for ``GDQConv2d``.
        controller: the :class:`~.gdq_layers.GranularBitController` (GBC, E2B, ATC).
        ctx: the shared :class:`~.gdq_layers.BitContext`.
        config: the :class:`GranularDQConfig` it was built from.
        last_bits: ``[N]`` int64 bit-widths of the last forward (for FAB), or None.
        model_config, scale, rgb_range: copied from the float model.
    """

    def __init__(
        self,
        net: nn.Module,
        controller: GranularBitController,
        ctx: BitContext,
        config: GranularDQConfig,
        arch: str,
    ) -> None:
        super().__init__()
        self.net = net
        self.controller = controller
        self.ctx = ctx
        self.config = config
        self.arch = arch
        self.scale = int(getattr(net, "scale", 1))
        self.rgb_range = float(getattr(net, "rgb_range", 255.0))
        if hasattr(net, "model_config"):
            self.model_config = dict(net.model_config)
        self.last_bits: Tensor | None = None

    # ---- forward ------------------------------------------------------------------------
    def forward_features(self, lr: Tensor) -> tuple[Tensor, Tensor]:
        """``(sr, feat)`` as the float model's ``forward_features``; sets :attr:`last_bits`."""
        ctx = self.ctx
        ctx.clear()
        ctx.lr, ctx.rgb_range = lr, self.rgb_range
        try:
            sr, feat = self.net.forward_features(lr)
            self.last_bits = None if ctx.bits is None else ctx.bits.detach()
        finally:
            ctx.clear()  # drop the selection (and its autograd graph) after the pass
        return sr, feat

    def forward(self, lr: Tensor) -> Tensor:
        """``[N, 3, H, W]`` in ``[0, rgb_range]`` -> ``[N, 3, sH, sW]``, not clamped."""
        return self.forward_features(lr)[0]

    @torch.no_grad()
    def decide_bits(self, lr: Tensor) -> Tensor:
        """The bit-width each patch of ``lr`` ``[N, 3, H, W]`` would get (head + controller only).

        Returns ``[N]`` int64. In eval mode with the default learned gate this is deterministic
        and equals what ``forward`` uses; with a random or official gate call it once and pass
        the result to :meth:`force_bits`.
        """
        _, spec = _arch_spec(self.net)
        ctx = self.ctx
        ctx.clear()
        ctx.lr, ctx.rgb_range = lr, self.rgb_range
        try:
            getattr(self.net, spec.head_attr)(spec.pre_head(self.net, lr))
            assert ctx.bits is not None
            return ctx.bits.clone()
        finally:
            ctx.clear()

    @contextlib.contextmanager
    def force_bits(self, bits: Tensor | Sequence[int] | int) -> Iterator[None]:
        """Within the block, every forward uses ``bits`` (an int, or ``[N]`` per sample)."""
        t = torch.as_tensor(bits, dtype=torch.long)
        bad = sorted(set(t.flatten().tolist()) - set(self.ctx.candidates))
        if bad:
            raise ValueError(
                f"force_bits: {bad} not among this model's bit-widths {self.ctx.candidates}"
            )
        prev, self.ctx.forced = self.ctx.forced, t
        try:
            yield
        finally:
            self.ctx.forced = prev

    # ---- E2B / ATC state ----------------------------------------------------------------
    @property
    def e2b(self) -> EntropyToBit | None:
        """The E2B module (None when E2B is off)."""
        return self.controller.e2b

    @property
    def entropy_thresholds(self) -> tuple[float, float] | None:
        """Current ``(H_t1, H_t2)`` (None if E2B is off or not calibrated yet)."""
        e2b = self.e2b
        if e2b is None or not e2b.ready:
            return None
        h1, h2 = e2b.thresholds.tolist()
        return (h1, h2)

    def set_entropy_table(self, table: EntropyTable | Sequence[float] | Tensor) -> None:
        """Install the training-set entropy quantile curve (thresholds and ATC use it).

        If the config gave ``entropy_thresholds`` they are kept (ATC starts from the levels at
        which the curve reaches them); otherwise the thresholds become the curve at
        ``entropy_quantiles``.
        """
        if self.e2b is None:
            return
        curve = table.curve if isinstance(table, EntropyTable) else table
        self.e2b.set_curve(curve, keep_thresholds=self.config.entropy_thresholds is not None)

    def set_atc(self, active: bool) -> None:
        """Enable ATC for the following training forwards (the recipe: first epoch only)."""
        self.controller.atc_active = bool(active) and self.config.use_atc

    @property
    def quant_config_dict(self) -> dict[str, Any]:
        """The config as a dict, with the current (calibrated) E2B thresholds filled in."""
        cfg = self.config
        thr = self.entropy_thresholds
        if thr is not None:
            cfg = dataclasses.replace(cfg, entropy_thresholds=thr)
        return cfg.to_dict()

    @quant_config_dict.setter
    def quant_config_dict(self, value: Mapping[str, Any]) -> None:
        # A generic quantize() assigns the config dict after the transform; keep it consistent.
        self.config = GranularDQConfig.from_dict(value)

    def extra_repr(self) -> str:
        return f"method=granular_dq, arch={self.arch}, compat={self.config.compat}"


def quantize_granular_dq(
    model: nn.Module, config: GranularDQConfig | Mapping[str, Any], *, inplace: bool = False
) -> GranularDQModel:
    """Quantize a float EDSR / RDN / SRResNet with Granular-DQ (module swap, docs/methods.md §2.3).

    Quantized (:class:`~.gdq_layers.GDQConv2d`): EDSR residual blocks' two convs; RDN residual
    dense blocks' dense-layer convs and local fusion 1x1; SRResNet residual blocks' two convs.
    Float: head, the conv after the body (EDSR/SRResNet), RDN's GFF, upsampler, tail. The head's
    output feeds the bit controller (GBC input ``Z1``).

    The activation steps are initialised lazily by the first training forward (run
    :func:`calibrate_granular_dq` on one batch); weight steps now, from the float weights.

    Args:
        model: a float model from :func:`lowbitsr.create_model` (weights loaded).
        config: a :class:`GranularDQConfig` or its dict form.
        inplace: swap inside ``model``'s own modules instead of a deep copy. Either way the
            result is a new :class:`GranularDQModel` object wrapping them: use the return value.

    Returns:
        The :class:`GranularDQModel` (same device, dtype and train/eval mode as ``model``).
    """
    if isinstance(model, GranularDQModel):
        raise ValueError("quantize_granular_dq: the model is already quantized with Granular-DQ")
    if not isinstance(config, GranularDQConfig):
        if isinstance(config, Mapping):
            config = GranularDQConfig.from_dict(config)
        else:
            raise TypeError(
                f"quantize_granular_dq: config must be a GranularDQConfig or a dict, got "
                f"{type(config).__name__}"
            )
    arch, spec = _arch_spec(model)
    net = model if inplace else copy.deepcopy(model)
    official = config.compat == "official"
    ctx = BitContext(config.candidates)
    for parent, name, conv in spec.targets(net):
        setattr(parent, name, GDQConv2d.from_float(conv, ctx, config.weight_bits, official))
    e2b = None
    if config.e2b_active:
        e2b = EntropyToBit(
            config.entropy_quantiles,
            config.entropy_thresholds,
            config.resolved_atc_gamma,
            official,
        )
    channels = int(net.n_feats)
    controller = GranularBitController(
        channels,
        config.candidates,
        config.gbc_bits,
        config.e2b_bits,
        gate=config.gate,
        tau=config.tau,
        fixed_bits=config.fixed_bits,
        random_probs=config.random_probs,
        e2b=e2b,
        official=official,
    )
    ref = next(net.parameters())
    controller.to(device=ref.device, dtype=ref.dtype)
    setattr(net, spec.head_attr, _HeadTap(getattr(net, spec.head_attr), ctx, controller))
    wrapper = GranularDQModel(net, controller, ctx, config, arch)
    return wrapper.train(model.training)


def _batchnorms(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def calibrate_granular_dq(model: GranularDQModel, lr: Tensor) -> None:
    """LSQ lazy initialisation of every activation quantizer from one batch (docs/methods.md §2.3).

    Runs one training-mode forward without gradient, with the bits forced to the largest
    candidate (initialisation covers every candidate's step from the full input, whatever the
    gate would pick), BatchNorm statistics frozen and ATC off. Quantizers already initialised
    (e.g. loaded from a checkpoint) are left alone. The model's mode is restored.

    Args:
        model: from :func:`quantize_granular_dq`.
        lr: ``[N, 3, h, w]`` training LR patches in ``[0, rgb_range]``, on the model's device.
    """
    was_training = model.training
    atc = model.controller.atc_active
    bns = [(m, m.training) for m in _batchnorms(model)]
    try:
        model.train()
        model.controller.atc_active = False
        for m, _ in bns:
            m.eval()
        with model.force_bits(max(model.ctx.candidates)):
            model(lr)
    finally:
        model.train(was_training)
        model.controller.atc_active = atc
        for m, mode in bns:
            m.train(mode)


# ============================================================================================
# Entropy table (E2B thresholds from the training set)
# ============================================================================================

ENTROPY_TABLE_FORMAT = "lowbitsr-entropy-table"


@dataclass(frozen=True)
class EntropyTable:
    """Quantiles of the E2B entropy over the training LR patches (docs/methods.md §2.2).

    Attributes:
        curve: entropy quantiles (nats) at the levels ``linspace(0, 1, len(curve))``.
        t1, t2: the quantile levels of the two thresholds (0.5, 0.9).
        patch: LR patch side used (0 = patches of mixed sizes, e.g. imported tables).
        n_patches: how many patches the curve was computed from.
        official: entropy measured the released way (top-left square).
    """

    curve: tuple[float, ...]
    t1: float = 0.5
    t2: float = 0.9
    patch: int = 48
    n_patches: int = 0
    official: bool = False
    meta: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def thresholds(self) -> tuple[float, float]:
        """``(H_t1, H_t2)``: the curve at ``t1`` and ``t2``."""
        c = torch.tensor(self.curve, dtype=torch.float64)
        h = interp_quantile_curve(c, torch.tensor([self.t1, self.t2], dtype=torch.float64))
        return (float(h[0]), float(h[1]))

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (``format`` tag, thresholds included for readers)."""
        h1, h2 = self.thresholds
        return {
            "format": ENTROPY_TABLE_FORMAT,
            "version": 1,
            "t1": self.t1,
            "t2": self.t2,
            "H_t1": h1,
            "H_t2": h2,
            "patch": self.patch,
            "n_patches": self.n_patches,
            "official": self.official,
            "levels": "linspace(0, 1, len(curve))",
            "curve": list(self.curve),
            "meta": dict(self.meta),
        }


def _lr_images(data: Any) -> Iterator[Tensor]:
    """Yield ``[3, H, W]`` float LR images (``[0, 255]``) from any accepted ``data`` form."""
    if hasattr(data, "load_pair") and hasattr(data, "pairs"):
        # A lowbitsr dataset: every whole LR image once (not the random training crops).
        for i in range(len(data.pairs)):
            lr, _ = data.load_pair(i)
            yield torch.from_numpy(np.ascontiguousarray(lr.transpose(2, 0, 1))).float()
        return
    if isinstance(data, Tensor):
        data = [data]
    for item in data:
        t = item["lr"] if isinstance(item, Mapping) else item
        t = torch.as_tensor(t)
        if t.dim() == 3:
            yield t.float()
        elif t.dim() == 4:
            yield from (img.float() for img in t)
        else:
            raise ValueError(
                f"entropy table: expected LR images [3, H, W] or batches [B, 3, H, W], got "
                f"shape {tuple(t.shape)}"
            )


def _tile_patches(img: Tensor, patch: int) -> Tensor:
    """Non-overlapping ``patch x patch`` tiles of ``[3, H, W]`` (remainder dropped); an image
    smaller than ``patch`` on a side counts as one patch."""
    _, h, w = img.shape
    if h < patch or w < patch:
        return img[None]
    nh, nw = h // patch, w // patch
    t = img[:, : nh * patch, : nw * patch].reshape(3, nh, patch, nw, patch)
    return t.permute(1, 3, 0, 2, 4).reshape(nh * nw, 3, patch, patch)


def compute_entropy_table(
    data: Any,
    patch: int = 48,
    t1: float = 0.5,
    t2: float = 0.9,
    *,
    max_patches: int | None = None,
    curve_points: int = 201,
    official: bool = False,
    chunk: int = 256,
) -> EntropyTable:
    """Entropy quantile curve of all non-overlapping LR patches of the training data (§2.2).

    Args:
        data: a lowbitsr dataset (its whole LR images are used, e.g.
            ``BundledDataset("train", 4)`` or a DIV2K dataset), or an iterable of LR images
            ``[3, H, W]`` / batches ``[B, 3, H, W]`` / dicts with an ``"lr"`` entry (a training
            batch stream). Values RGB in ``[0, 255]``.
        patch: LR patch side (48 = the training crop).
        t1, t2: quantile levels of the two thresholds.
        max_patches: stop after this many patches (None = all).
        curve_points: resolution of the stored quantile curve.
        official: measure entropy the released way (top-left square).
        chunk: patches per entropy evaluation (memory: ``chunk * patch^2 * 32`` floats).

    Returns:
        :class:`EntropyTable`; ``table.thresholds`` is ``(H_t1, H_t2)``.
    """
    if not 0.0 <= t1 <= t2 <= 1.0:
        raise ValueError(f"need 0 <= t1 <= t2 <= 1, got t1={t1}, t2={t2}")
    entropies: list[Tensor] = []
    pending: list[Tensor] = []
    n = 0

    def flush() -> None:
        while pending:
            batch = pending.pop()
            for i in range(0, batch.shape[0], chunk):
                entropies.append(patch_entropy(batch[i : i + chunk], official=official).double())

    for img in _lr_images(data):
        patches = _tile_patches(img, patch)
        if max_patches is not None:
            patches = patches[: max(0, max_patches - n)]
        pending.append(patches)
        n += patches.shape[0]
        flush()
        if max_patches is not None and n >= max_patches:
            break
    if n == 0:
        raise ValueError("compute_entropy_table: the data held no LR patches")
    h = torch.cat(entropies)
    levels = torch.linspace(0, 1, curve_points, dtype=torch.float64)
    curve = torch.quantile(h, levels) if h.numel() <= 2**24 else _big_quantile(h, levels)
    return EntropyTable(
        tuple(float(v) for v in curve), t1, t2, patch, int(h.numel()), official=official
    )


def _big_quantile(h: Tensor, levels: Tensor) -> Tensor:
    s, _ = torch.sort(h)
    pos = levels * (s.numel() - 1)
    lo = pos.floor().long()
    hi = pos.ceil().long()
    return torch.lerp(s[lo], s[hi], pos - lo.double())


def build_entropy_table(
    data: Any, patch: int = 48, t1: float = 0.5, t2: float = 0.9, **kwargs: Any
) -> tuple[float, float]:
    """E2B thresholds ``(H_t1, H_t2)`` from the training LR patches (docs/methods.md §2.2).

    The ``t1``/``t2`` quantiles of :func:`patch_entropy` over every non-overlapping
    ``patch x patch`` tile of the training LR images. ``kwargs`` go to
    :func:`compute_entropy_table`, which returns the whole quantile curve (what ATC and
    :func:`save_entropy_table` need).
    """
    return compute_entropy_table(data, patch, t1, t2, **kwargs).thresholds


def entropy_table_path(checkpoint: str | Path) -> Path:
    """Where the entropy table of a saved model lives: ``<stem>.entropy.json`` beside it."""
    from ..fileio import model_paths

    weights, _ = model_paths(checkpoint)
    return weights.with_suffix(".entropy.json")


def save_entropy_table(table: EntropyTable, path: str | Path) -> Path:
    """Write ``table`` as JSON (atomically). ``path`` may be a checkpoint: then it goes to
    :func:`entropy_table_path` beside it."""
    from ..fileio import atomic_write

    p = Path(path)
    if p.suffix != ".json":
        p = entropy_table_path(p)
    text = json.dumps(table.to_dict(), indent=2)
    atomic_write(p, lambda t: t.write_text(text))
    return p


def load_entropy_table(path: str | Path, curve_points: int = 201) -> EntropyTable:
    """Read a table written by :func:`save_entropy_table`, or the released ``E2B.json``.

    The released file maps a percentage level (``"0.5"`` ... ``"99.5"``) to an entropy; it is
    resampled onto our uniform grid (levels outside its range take its end values).
    A checkpoint path (or run folder) reads the table beside it.
    """
    p = Path(path)
    if p.suffix != ".json":
        p = entropy_table_path(p)
    data = json.loads(p.read_text())
    if isinstance(data, dict) and data.get("format") == ENTROPY_TABLE_FORMAT:
        return EntropyTable(
            tuple(float(v) for v in data["curve"]),
            float(data.get("t1", 0.5)),
            float(data.get("t2", 0.9)),
            int(data.get("patch", 0)),
            int(data.get("n_patches", 0)),
            official=bool(data.get("official", False)),
            meta=dict(data.get("meta", {})),
        )
    try:
        pairs = sorted((float(k) / 100.0, float(v)) for k, v in data.items())
    except (AttributeError, TypeError, ValueError):
        raise ConfigError(
            f"{p}: not an entropy table (neither lowbitsr's format nor the released "
            "'percent -> entropy' E2B.json)"
        ) from None
    levels = np.linspace(0, 1, curve_points)
    xs, ys = zip(*pairs, strict=True)
    curve = np.interp(levels, xs, ys)
    meta = {"from": str(p)}
    return EntropyTable(tuple(float(v) for v in curve), patch=0, official=True, meta=meta)


# ============================================================================================
# Tiled inference (§2.4)
# ============================================================================================


def gdq_tile_starts(size: int, tile: int, step: int) -> list[int]:
    """Tile start offsets along one axis: ``0, step, 2 step, ...`` then one tile aligned to the
    far border (so every tile has the same size). A side ``<= tile`` is one tile."""
    if tile <= 0 or step <= 0 or step > tile:
        raise ValueError(f"need 0 < step <= tile, got tile={tile}, step={step}")
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile, step))
    starts.append(size - tile)
    return starts


def _own_bounds(starts: list[int], tile: int, size: int) -> list[int]:
    """Region boundaries: tile ``i`` keeps ``[b[i], b[i+1])``; a boundary is the middle of the
    two tiles' overlap (for tile 96 / step 90: 3 pixels into the next tile, as released)."""
    bounds = [0]
    for a, b in itertools.pairwise(starts):
        bounds.append((b + min(a + tile, size)) // 2)
    bounds.append(size)
    return bounds


@torch.no_grad()
def gdq_super_resolve(
    model: nn.Module,
    lr: Tensor,
    scale: int,
    tile: int = 96,
    step: int = 90,
    *,
    batched: bool = True,
    max_batch: int = 16,
) -> tuple[Tensor, Tensor]:
    """Granular-DQ tiled inference (docs/methods.md §2.4): each LR tile at its own bit-width.

    The image is split into ``tile x tile`` LR tiles every ``step`` pixels (the last row/column
    aligned to the border, so all tiles have one size). Stitching: each tile keeps its own
    region, the part of the image closer to it than to its neighbour, i.e. overlaps are split
    at their middle (same rule as the released code's ``combine``; no blending).

    ``batched=True``: the bits of all tiles are decided first (``model.decide_bits``), then the
    tiles of each bit-width run together (batches of at most ``max_batch``, bits forced to the
    decision). ``batched=False``: one tile per forward, the model deciding itself (the released
    code's loop; the benchmark's baseline). A model without ``decide_bits`` (a float model)
    runs at 32 bits. Both ways give the same bit map and the same image, bit for bit in float64;
    in float32 a conv rounds differently for batch 1 and batch N (about 1e-7 relative), which
    a quantizer can turn into a one-level step at a few pixels.

    Call ``model.eval()`` first.

    Args:
        model: a :class:`GranularDQModel` (or any SR model ``[N, 3, h, w] -> [N, 3, sh, sw]``).
        lr: ``[1, 3, H, W]`` RGB in ``[0, rgb_range]`` on the model's device.
        scale: the model's upscaling factor.
        tile, step: tile size and step in LR pixels (``0 < step <= tile``).
        batched: group tiles by bit-width (True) or run them one by one.
        max_batch: largest number of tiles per forward.

    Returns:
        ``(sr, bit_map)``: ``sr`` ``[1, 3, sH, sW]`` (not clamped); ``bit_map``
        ``[n_rows, n_cols]`` int64 on the CPU, the bit-width of every tile. The image's FAB is
        :func:`~lowbitsr.quant.bitops.fab` ``(bit_map)``.
    """
    if lr.dim() != 4 or lr.shape[0] != 1:
        raise ValueError(f"gdq_super_resolve takes one image [1, 3, H, W], got {tuple(lr.shape)}")
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    _, c, h, w = lr.shape
    ys, xs = gdq_tile_starts(h, tile, step), gdq_tile_starts(w, tile, step)
    th, tw = min(tile, h), min(tile, w)
    by, bx = _own_bounds(ys, th, h), _own_bounds(xs, tw, w)
    boxes = [(i, j) for i in range(len(ys)) for j in range(len(xs))]
    out = lr.new_empty((1, c, h * scale, w * scale))
    s = scale

    def crop(k: int) -> Tensor:
        i, j = boxes[k]
        return lr[0, :, ys[i] : ys[i] + th, xs[j] : xs[j] + tw]

    def place(k: int, sr: Tensor) -> None:
        i, j = boxes[k]
        y0, y1, x0, x1 = by[i], by[i + 1], bx[j], bx[j + 1]
        oy, ox = (y0 - ys[i]) * s, (x0 - xs[j]) * s
        out[0, :, y0 * s : y1 * s, x0 * s : x1 * s] = sr[
            :, oy : oy + (y1 - y0) * s, ox : ox + (x1 - x0) * s
        ]

    n = len(boxes)
    bits = torch.full((n,), 32, dtype=torch.long)
    decide = getattr(model, "decide_bits", None)
    force = getattr(model, "force_bits", None)
    if not batched:
        for k in range(n):
            out_k = model(crop(k)[None])
            last = getattr(model, "last_bits", None)
            if last is not None:
                bits[k] = int(last[0])
            place(k, out_k[0])
        return out, bits.view(len(ys), len(xs))
    tiles = torch.stack([crop(k) for k in range(n)])
    if callable(decide) and callable(force):
        bits = torch.cat([decide(tiles[a : a + max_batch]).cpu() for a in range(0, n, max_batch)])
    for b in sorted(set(bits.tolist())):
        idx = torch.nonzero(bits == b).flatten().tolist()
        for a in range(0, len(idx), max_batch):
            group = idx[a : a + max_batch]
            batch = tiles[group]
            ctx = force(b) if callable(force) and callable(decide) else contextlib.nullcontext()
            with ctx:
                sr = model(batch)
            for k, sr_k in zip(group, sr, strict=True):
                place(k, sr_k)
    return out, bits.view(len(ys), len(xs))


# ============================================================================================
# Training recipe
# ============================================================================================

#: LR patches the recipe collects from the training stream for the entropy table.
TABLE_PATCHES = 64


class GranularDQRecipe(Recipe):
    """Quantization-aware training with Granular-DQ (docs/methods.md §2.4).

    ``cfg.quant`` is the dict form of :class:`GranularDQConfig` (``{method: granular_dq, ...}``).

    * :meth:`prepare`: swap (:func:`quantize_granular_dq`); unless resuming, build the entropy
      table from about 64 training LR patches of the calibration stream when E2B needs it
      (thresholds not given, or ATC on), save it as ``<run_dir>/entropy_table.json``, and run
      the LSQ lazy init on one batch. On resume it only rebuilds; the checkpoint restores every
      tensor (steps, thresholds, ATC levels, curve).
    * :meth:`loss`: L1 only; ATC active during the first ``atc_iterations`` steps
      (default ``train.iterations // 10``, "the first epoch").
    * :meth:`quant_dict`: the config with the calibrated thresholds, so a saved model reloads
      identically.
    """

    ddp_find_unused_parameters = True  # only the drawn bit-widths' quantizers run in a step

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        self.qcfg = GranularDQConfig.from_dict(cfg.quant or {})
        self.model: GranularDQModel | None = None
        self.table: EntropyTable | None = None

    @property
    def atc_iterations(self) -> int:
        """Training steps during which ATC runs."""
        if self.qcfg.atc_iterations is not None:
            return self.qcfg.atc_iterations
        return max(1, int(self.cfg.train.iterations) // 10)

    def prepare(
        self,
        model: nn.Module,
        batches: Iterator[dict[str, Any]],
        resume_state: dict[str, Any] | None = None,
    ) -> nn.Module:
        qmodel = quantize_granular_dq(model, self.qcfg)
        if resume_state is None:
            device = next(qmodel.parameters()).device
            batch = next(batches)
            q = self.qcfg
            if q.e2b_active and (q.entropy_thresholds is None or q.use_atc):
                lrs = [batch["lr"]]
                while sum(t.shape[0] for t in lrs) < TABLE_PATCHES:
                    lrs.append(next(batches)["lr"])
                patch = int(min(batch["lr"].shape[-2:]))
                t1, t2 = q.entropy_quantiles
                official = q.compat == "official"
                self.table = compute_entropy_table(lrs, patch, t1, t2, official=official)
                qmodel.set_entropy_table(self.table)
                with contextlib.suppress(OSError):
                    save_entropy_table(self.table, Path(self.cfg.run_dir) / "entropy_table.json")
            calibrate_granular_dq(qmodel, batch["lr"].to(device))
        self.model = qmodel
        return qmodel

    def loss(
        self, model: nn.Module, batch: dict[str, Tensor], step: int
    ) -> tuple[Tensor, dict[str, float]]:
        if hasattr(model, "set_atc"):  # the model itself or its distributed wrapper
            model.set_atc(step < self.atc_iterations)
        sr = model(batch["lr"])
        loss = F.l1_loss(sr, batch["hr"])
        logs = {"l1": float(loss.detach())}
        bits = getattr(model, "last_bits", None)
        if bits is not None:
            logs["bits"] = fab(bits)
        return loss, logs

    def state(self) -> dict[str, Any]:
        m = self.model
        out: dict[str, Any] = {"method": GranularDQConfig.method, "calibrated": m is not None}
        if m is not None:
            out["entropy_thresholds"] = m.entropy_thresholds
            if m.e2b is not None:
                out["atc_levels"] = m.e2b.levels.tolist()
        return out

    def quant_dict(self) -> dict[str, Any] | None:
        if self.model is not None:
            return self.model.quant_config_dict
        return self.qcfg.to_dict()
