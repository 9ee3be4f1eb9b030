"""The packed integer format of DDTB/PAMS models: codes, bit packing, and loading them back.

Writing (freezing a trained fake-quant model) lives in :mod:`lowbitsr.deploy.pack`; this module
holds what reading needs, so that lower layers (e.g. shipped weights) can load packed models.

A *packed model* is **one** safetensors file. Its tensors:

====================================  =============================================================
key                                   content
====================================  =============================================================
``<param>.packed``                    uint8, 1-D: the integer codes of a quantized conv weight
                                      (``<param>`` is its state-dict key, e.g.
                                      ``body.0.body.2.weight``; the DDTB gates' 1×1 ternary convs
                                      too), bit-packed as described below
``<param>.scale``                     float32 ``[1]``: ``s`` (asym: 1/step, docs/methods.md §1.1)
                                      or ``m`` (sym: the max-abs, §1.2 / §1.8)
``<param>.zero_point``                float32 ``[1]``, integer-valued: ``zp`` (asym only)
any other state-dict key              as in the model: float32 (biases, activation bounds
                                      ``lower``/``upper``, PAMS ``alpha``, BN affine and running
                                      statistics, head/tail/upsampler/mean-shift weights), int64
                                      ``num_batches_tracked``
====================================  =============================================================

Weight codes (per tensor, exactly the quantizer of the fake-quant model):

- ``asym`` (DDTB body convs, docs/methods.md §1.2): ``w = (q + zp) / s`` with ``q`` in
  ``[-2**(k-1), 2**(k-1) - 1]`` (``2**(k-1)`` can also occur in ``compat="official"``, whose codes
  are not clamped: the layer is then packed at ``k + 1`` bits, ``pack_bits`` in the header);
- ``sym`` (PAMS convs, §1.8, and the DDTB gates' ternary convs, §1.2): ``w = q * m / qmax``,
  ``qmax = 2**(k-1) - 1``, ``q`` in ``[-qmax, qmax]``;
- ``float``: a weight whose bounds coincide (the quantizer returns it unchanged), stored as is.

These are the fake-quant formulas in their own operation order, so the dequantized weight
reproduces ``QuantConv2d.quantized_weight()`` **bit for bit** in float32; :func:`convert` checks it
for every layer and refuses to write a file that would not.

Packing: the unsigned code ``u = q - qmin`` (``qmin = -2**(k-1)`` asym, ``-qmax`` sym) of every
element, in the weight's row-major (C-contiguous ``[C_out, C_in, kH, kW]``) order, is written as a
dense LSB-first bit stream of ``pack_bits`` bits per element: element ``i`` occupies stream bits
``[i*b, (i+1)*b)`` and stream bit ``j`` is bit ``j % 8`` of byte ``j // 8``; the last byte is
zero-padded. So 2-bit codes are four per byte (element ``4i+t`` in bits ``2t..2t+1`` of byte
``i``), 4-bit codes two per byte (low nibble first) and 3-bit codes are packed densely, eight codes
in three bytes (no nibble padding).

Safetensors metadata (all strings): ``format`` = ``"lowbitsr-packed"``, ``version`` = ``"1"``,
``layout`` = a JSON document with ``model`` (the ``model_config`` for
:func:`lowbitsr.models.create_model`), ``quant`` (the quantization config dict), ``gated`` (DDTB
quantizers that carry a gate), ``gate_applied`` (their flag), ``packing`` (the rules above, in
words) and ``tensors``: for every packed parameter ``{"scheme", "bits", "pack_bits", "qmin",
"shape", "count"}``.

:func:`load_packed` rebuilds the model (``create_model`` → ``quantize`` → load), with every
quantized conv replaced by a :class:`PackedConv2d` that uses its (dequantized, already on-grid)
weight as is: re-running the weight quantizer on grid values would recompute its bounds from them
and is not idempotent. Its outputs equal the original fake-quant model's bit for bit on CPU.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn

from ..errors import CheckpointError, ConfigError
from .functional import asym_quant_params, asym_quantize_codes, maxabs_scale, weight_bounds
from .layers import DDTBActQuant, QuantConv2d, conv_geometry

__all__ = [
    "PACKED_FORMAT",
    "PACKED_VERSION",
    "PackError",
    "PackedConv2d",
    "WeightCodes",
    "is_packed_file",
    "load_packed",
    "pack_codes",
    "packed_path",
    "unpack_codes",
    "weight_codes",
]


PACKED_FORMAT = "lowbitsr-packed"


PACKED_VERSION = 1


_PACKING_RULES = (
    "u = q - qmin (unsigned); dense LSB-first bit stream of pack_bits bits per element in "
    "row-major order: element i occupies stream bits [i*b, (i+1)*b), stream bit j is bit j%8 "
    "of byte j//8, last byte zero-padded; asym: w = (q + zp) / s, sym: w = q * m / qmax"
)


Scheme = Literal["asym", "sym", "float"]


class PackError(CheckpointError):
    """A model cannot be frozen into (or rebuilt from) a packed integer artifact."""


# ------------------------------------------------------------------------------- bit packing
def pack_codes(u: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned codes into a dense LSB-first bit stream (module docstring).

    Args:
        u: integer array, any shape (flattened in C order), values in ``[0, 2**bits - 1]``.
        bits: bits per element, 1..8.

    Returns:
        uint8 1-D array of ``ceil(u.size * bits / 8)`` bytes.
    """
    if not 1 <= bits <= 8:
        raise ValueError(f"pack_codes: bits must be in 1..8, got {bits}")
    flat = np.asarray(u).reshape(-1).astype(np.uint64)
    if flat.size and int(flat.max()) >= 1 << bits:
        raise ValueError(f"pack_codes: a code does not fit in {bits} bits (max {int(flat.max())})")
    n = flat.size
    span = math.lcm(bits, 8)  # one group: span // bits codes in span // 8 bytes
    per, nbytes = span // bits, span // 8
    groups = -(-n // per)
    padded = np.zeros(groups * per, dtype=np.uint64)
    padded[:n] = flat
    shifts = (np.arange(per, dtype=np.uint64) * np.uint64(bits))[None, :]
    v = np.bitwise_or.reduce(padded.reshape(groups, per) << shifts, axis=1)
    byte_shifts = (np.arange(nbytes, dtype=np.uint64) * np.uint64(8))[None, :]
    out = ((v[:, None] >> byte_shifts) & np.uint64(0xFF)).astype(np.uint8).reshape(-1)
    return out[: -(-n * bits // 8)]


def unpack_codes(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_codes`: the first ``count`` codes of a packed stream.

    Args:
        packed: uint8 1-D array from :func:`pack_codes`.
        bits: bits per element, 1..8.
        count: number of elements.

    Returns:
        int64 1-D array of ``count`` unsigned codes in ``[0, 2**bits - 1]``.
    """
    if not 1 <= bits <= 8:
        raise ValueError(f"unpack_codes: bits must be in 1..8, got {bits}")
    need = -(-count * bits // 8)
    raw = np.asarray(packed, dtype=np.uint8).reshape(-1)
    if raw.size != need:
        raise ValueError(
            f"unpack_codes: {count} codes of {bits} bits need {need} bytes, got {raw.size}"
        )
    span = math.lcm(bits, 8)
    per, nbytes = span // bits, span // 8
    groups = -(-count // per)
    buf = np.zeros(groups * nbytes, dtype=np.uint64)
    buf[:need] = raw
    byte_shifts = (np.arange(nbytes, dtype=np.uint64) * np.uint64(8))[None, :]
    v = np.bitwise_or.reduce(buf.reshape(groups, nbytes) << byte_shifts, axis=1)
    shifts = (np.arange(per, dtype=np.uint64) * np.uint64(bits))[None, :]
    codes = (v[:, None] >> shifts) & np.uint64((1 << bits) - 1)
    return codes.reshape(-1)[:count].astype(np.int64)


# ------------------------------------------------------------------------------- weight codes
@dataclass(frozen=True)
class WeightCodes:
    """The integer form of one per-tensor quantized conv weight.

    Attributes:
        scheme: ``"asym"`` (``w = (q + zp) / s``), ``"sym"`` (``w = q * m / qmax``) or
            ``"float"`` (not quantized: ``codes`` holds nothing, ``scale`` the weight itself).
        bits: the quantizer's bit-width ``k``.
        codes: int8 tensor of the weight's shape, integer codes ``q`` (asym: in
            ``[-2**(k-1), 2**(k-1)]``; sym: ``[-qmax, qmax]``).
        scale: float32 ``[1]``: ``s`` (asym) or ``m`` (sym); the float weight for ``"float"``.
        zero_point: float32 ``[1]`` integer-valued ``zp`` (asym), else None.
    """

    scheme: Scheme
    bits: int
    codes: Tensor
    scale: Tensor
    zero_point: Tensor | None = None

    @property
    def qmax(self) -> float:
        """``2**(k-1) - 1`` (the symmetric code range)."""
        return 2.0 ** (self.bits - 1) - 1.0

    @property
    def qmin(self) -> int:
        """Smallest code the scheme can produce (the offset of the unsigned packed codes)."""
        return -(2 ** (self.bits - 1)) if self.scheme == "asym" else -int(self.qmax)

    def dequantize(self) -> Tensor:
        """The float32 weight, bit-identical to the fake quantizer's output (same op order)."""
        if self.scheme == "float":
            return self.scale
        q = self.codes.to(torch.float32)
        if self.scheme == "asym":
            assert self.zero_point is not None
            return (q + self.zero_point) / self.scale
        return q * self.scale / self.qmax

    def step_and_zero(self) -> tuple[float, int]:
        """ONNX ``DequantizeLinear`` parameters ``(scale, zero_point)`` with
        ``w ≈ (code - zero_point) * scale``: asym ``(1/s, -zp)``, sym ``(m/qmax, 0)``. The step is
        the float32 rounding of the exact float64 value, so ``(q - z) * step`` differs from the
        fake-quant weight by at most about one float32 ulp."""
        if self.scheme == "asym":
            assert self.zero_point is not None
            return float(np.float32(1.0 / float(self.scale))), -int(self.zero_point)
        if self.scheme == "sym":
            return float(np.float32(float(self.scale) / self.qmax)), 0
        raise ValueError("a 'float' weight has no integer form")


def _unquantized(conv: QuantConv2d) -> WeightCodes:
    w = conv.weight.detach().to(torch.float32).clone()
    return WeightCodes("float", conv.w_bits, torch.zeros(0, dtype=torch.int8), w)


def weight_codes(conv: QuantConv2d) -> WeightCodes:
    """Integer codes and parameters of a quantized conv's weight (exactly its quantizer).

    Args:
        conv: a :class:`~lowbitsr.quant.layers.QuantConv2d` (or :class:`PackedConv2d`, which
            returns the codes it was loaded with) with ``enabled`` True, float32 weight.

    Returns:
        :class:`WeightCodes` whose :meth:`~WeightCodes.dequantize` equals
        ``conv.quantized_weight()`` bit for bit (checked).

    Raises:
        PackError: quantization disabled, or the codes do not reproduce the weight exactly.
    """
    if isinstance(conv, PackedConv2d):
        return conv.codes
    if not conv.enabled:
        raise PackError(
            "weight_codes: a QuantConv2d has enabled=False (mid-calibration?); finish "
            "calibrate() before packing or exporting"
        )
    w = conv.weight.detach().cpu().to(torch.float32)
    bits = conv.w_bits
    with torch.no_grad():
        target = conv._quantize(w)
        if conv.w_mode in ("percentile", "minmax"):
            lower, upper, clip = weight_bounds(w, conv.w_mode)
            if bool(upper == lower):
                return _unquantized(conv)
            s, zp = asym_quant_params(lower, upper, bits)
            q = asym_quantize_codes(w, lower, upper, bits, clip=clip, clamp_codes=conv.clamp_codes)
            codes = WeightCodes("asym", bits, q.to(torch.int8), s.clone(), zp.clone())
        else:  # "pams" / "ternary": symmetric per-tensor max-abs
            qmax = 2.0 ** (bits - 1) - 1.0
            m = maxabs_scale(w).reshape(1)
            q = torch.round(w * qmax / m)
            codes = WeightCodes("sym", bits, q.to(torch.int8), m.clone())
    if not torch.equal(codes.dequantize(), target):
        raise PackError(
            f"weight_codes: the integer codes of a {conv.w_mode} {bits}-bit conv do not "
            "reproduce its fake-quantized weight bit for bit; the quantizer in "
            "lowbitsr.quant.functional changed its formula (update lowbitsr.deploy.pack)"
        )
    return codes


class PackedConv2d(QuantConv2d):
    """A :class:`~lowbitsr.quant.layers.QuantConv2d` frozen from a packed artifact.

    Its ``weight`` already holds the dequantized k-bit grid values, used as is (quantizing grid
    values again would recompute the bounds from them, which is not idempotent). ``codes``
    (:class:`WeightCodes`) keeps the integer form for re-packing and ONNX export. Same state-dict
    keys, ``w_bits``/``w_mode``/``a_bits`` as the conv it replaces. Inference only: the weight is
    not re-quantized after training steps.
    """

    codes: WeightCodes

    @classmethod
    def from_quant(cls, conv: QuantConv2d, codes: WeightCodes) -> PackedConv2d:
        """Wrap ``conv`` (sharing its weight and bias parameters) with its integer codes."""
        new = cls(
            **conv_geometry(conv),
            w_bits=conv.w_bits,
            w_mode=conv.w_mode,
            clamp_codes=conv.clamp_codes,
        )
        new.weight = conv.weight
        new.bias = conv.bias
        if hasattr(conv, "a_bits"):
            new.a_bits = conv.a_bits
        new.codes = codes
        new.train(conv.training)
        return new

    def quantized_weight(self) -> Tensor:
        """The stored dequantized weight ``[C_out, C_in/groups, kH, kW]`` (already on the grid)."""
        return self.weight

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, packed={self.codes.scheme}"


# ------------------------------------------------------------------------------- model walk
def _all_quant_convs(model: nn.Module) -> list[tuple[str, QuantConv2d]]:
    """Every weight-quantized conv, gate convs included, in registration order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QuantConv2d)]


def packed_path(path: str | Path) -> Path:
    """``path`` with a ``.safetensors`` suffix added when it has none."""
    p = Path(path)
    return p if p.suffix == ".safetensors" else p.with_name(p.name + ".safetensors")


def is_packed_file(path: str | Path) -> bool:
    """Whether ``path`` (suffix optional) is a packed model written by :func:`save_packed`
    (checks the safetensors metadata only; False for missing or other files)."""
    p = packed_path(path)
    if not p.is_file():
        return False
    try:
        with safe_open(str(p), framework="pt") as f:
            return (f.metadata() or {}).get("format") == PACKED_FORMAT
    except (SafetensorError, OSError):
        return False


def _read_packed(path: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != PACKED_FORMAT:
                raise PackError(
                    f"{path}: not a lowbitsr packed model (metadata format "
                    f"{meta.get('format')!r}); saved float/fake-quant models load with "
                    "lowbitsr.load_model"
                )
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open API)
        layout = json.loads(meta["layout"])
    except (SafetensorError, OSError, KeyError, json.JSONDecodeError) as exc:
        raise PackError(f"{path}: not a readable lowbitsr packed model ({exc})") from None
    if int(meta.get("version", "0")) > PACKED_VERSION:
        raise PackError(
            f"{path}: packed format version {meta.get('version')} is newer than this lowbitsr "
            f"({PACKED_VERSION}); upgrade lowbitsr"
        )
    return tensors, layout


def _codes_from_file(tensors: Mapping[str, Tensor], key: str, e: Mapping[str, Any]) -> WeightCodes:
    u = unpack_codes(tensors[f"{key}.packed"].numpy(), int(e["pack_bits"]), int(e["count"]))
    q = torch.from_numpy(u + int(e["qmin"])).to(torch.int8).reshape(e["shape"])
    zp = tensors.get(f"{key}.zero_point")
    return WeightCodes(e["scheme"], int(e["bits"]), q, tensors[f"{key}.scale"].clone(), zp)


def load_packed(path: str | Path, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the fake-quant model from a packed file (inverse of :func:`save_packed`).

    Args:
        path: the packed ``.safetensors`` file (suffix optional).
        map_location: device of the returned model.

    Returns:
        The model in eval mode, every quantized conv a :class:`PackedConv2d`; on CPU its
        outputs equal the packed model's bit for bit. Input/output as the original model:
        N×3×H×W float32 in [0, rgb_range] → N×3×sH×sW.

    Raises:
        PackError: missing, unreadable or not a packed model, or inconsistent contents.
    """
    from ..models import create_model
    from .apply import config_from_dict, quantize

    p = packed_path(path)
    if not p.is_file():
        raise PackError(f"{p}: packed model not found")
    tensors, layout = _read_packed(p)
    try:
        model = create_model(**layout["model"])
        model = quantize(model, config_from_dict(layout["quant"]), inplace=True)
    except (TypeError, ValueError, ConfigError) as exc:
        raise PackError(f"{p}: cannot build the model it describes ({exc})") from None
    entries: dict[str, dict[str, Any]] = layout["tensors"]
    codes = {k: _codes_from_file(tensors, k, e) for k, e in entries.items()}
    suffixes = (".packed", ".scale", ".zero_point")
    state = {
        k: v
        for k, v in tensors.items()
        if not (k.endswith(suffixes) and k.rsplit(".", 1)[0] in entries)
    }
    for k, c in codes.items():
        state[k] = c.dequantize()
    try:
        model.load_state_dict(state, strict=True)  # attaches the gates from their keys
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise PackError(f"{p}: contents do not match the model it describes ({first})") from None
    for name, conv in _all_quant_convs(model):
        key = f"{name}.weight"
        frozen = PackedConv2d.from_quant(conv, codes[key] if key in codes else _unquantized(conv))
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, frozen)
    for name, applied in layout.get("gate_applied", {}).items():
        q = model.get_submodule(name)
        if isinstance(q, DDTBActQuant):
            q.gate_applied = bool(applied)
    return model.to(map_location).eval()
