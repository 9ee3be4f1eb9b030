"""Granular-DQ configuration: :class:`GranularDQConfig` (docs/methods.md §2) and its checks."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from ...errors import ConfigError

_GATES = ("learned", "random", "fixed")
_COMPATS = ("default", "official")
#: ATC decay: ours (docs/methods.md §2.2) and the released code's.
DEFAULT_ATC_GAMMA = 0.9997
OFFICIAL_ATC_GAMMA = 0.99997


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
        gbc_tile_stats: the GBC's linear layer also reads three statistics of the LR patch
            (:func:`~lowbitsr.quant.gdq_layers.tile_statistics`: log std, log mean gradient,
            mean brightness), which the GroupNorm'ed descriptor loses. Not in the paper (off by
            default); the rate–distortion controller uses it (docs/methods.md §2.6).
        image_fab: per-image rate control of tiled inference (:func:`gdq_super_resolve`):
            the learned GBC's logits of all tiles of one image get one bias along the bits,
            the smallest that puts the image's mean bits at most ``image_fab``, so every image
            stays within the budget whatever its content (a controller fitted on other images
            drifts: docs/methods.md §2.6). None (default, the paper): each tile decides
            alone. Needs ``gate: learned``, E2B off and ``compat: default``; a plain forward
            of a batch is not affected.
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
    gbc_tile_stats: bool = False
    image_fab: float | None = None

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
        for key in ("use_e2b", "use_atc", "gbc_tile_stats"):
            if not isinstance(getattr(self, key), bool):
                raise _bad(key, getattr(self, key), "write true or false")
        if self.gbc_tile_stats and self.compat == "official":
            raise _bad("gbc_tile_stats", True, "not part of the released code; use compat: default")
        self._check_image_fab()
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

    def _check_image_fab(self) -> None:
        f = self.image_fab
        if f is None:
            return
        lo, hi = min(self.gbc_bits), max(self.gbc_bits)
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not lo <= f <= hi:
            raise _bad("image_fab", f, f"write a number between {lo} and {hi} (gbc_bits), or null")
        if self.gate != "learned" or self.e2b_active or self.compat != "default":
            raise _bad(
                "image_fab",
                f,
                "per-image rate control shifts the learned GBC's logits: it needs gate: learned, "
                "use_e2b: false and compat: default",
            )
        object.__setattr__(self, "image_fab", float(f))

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
