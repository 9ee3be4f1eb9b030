"""PyTorch int8 inference of integer-layout EDSR models (``quant.layout: integer``).

:func:`to_torch_int8` turns a DDTB- or PAMS-quantized EDSR in the integer layout into a
:class:`TorchInt8SR`: every body and upsampler conv a PyTorch quantized conv (u8 activations ×
s8 weights, int32 accumulation, requantized to the next quantizer's codes; the x86 engine runs
them on oneDNN's VNNI/AMX kernels), the residual stream a quantized add, the k-bit range of each
quantizer a clamp of its 8-bit codes, the pixel shuffles on codes. It computes what the ONNX
export computes (:mod:`~lowbitsr.deploy.onnx_export`, the same codes, scales and folded ReLUs):
the PyTorch fake-quant model up to the int32 bias rounding and rounding ties.

Head conv, mean shifts and the last body conv stay float, as in the export. PyTorch marks its
quantized tensors deprecated (a warning, silenced here); the backend is kept small for that.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import LowbitsrError
from ..models.edsr import EDSR
from ..quant.layers import QuantConv2d, QuantInputConv, QuantResBlock
from ..quant.packed import weight_codes
from .onnx_ops.graph import _QParams
from .onnx_ops.quantizers import static_act_params

__all__ = ["TorchInt8SR", "to_torch_int8"]

_ENGINE = "x86"


class _Quant:
    """A static quantizer as 8-bit codes: ``(code - zero) * step`` clamped to ``[lo, hi]``
    (``lo`` raised to the zero point when the quantizer reads a ReLU)."""

    def __init__(self, qp: _QParams, lo: int, hi: int, relu: bool = False) -> None:
        self.step, self.zero = float(qp.step), int(qp.zero)
        lo = max(lo, self.zero) if relu else lo
        self.lo_v, self.hi_v = (lo - self.zero) * self.step, (hi - self.zero) * self.step
        self.full = lo == 0 and hi == 255

    def clamp(self, q: Tensor) -> Tensor:
        return q if self.full else torch.clamp(q, self.lo_v, self.hi_v)

    def __call__(self, x: Tensor) -> Tensor:
        return self.clamp(torch.quantize_per_tensor(x, self.step, self.zero, torch.quint8))


def _quant(q: nn.Module, name: str, relu: bool = False) -> _Quant:
    static = static_act_params(q, "uint8", name)
    if static is None:
        raise LowbitsrError(
            f"{name}: not a static uint8 quantizer; the PyTorch int8 backend needs a DDTB/PAMS "
            "model in the integer layout (quant.layout: integer)"
        )
    return _Quant(*static, relu=relu)


def _qconv(conv: nn.Module, x_q: _Quant, out_q: _Quant, post_scale: float, name: str) -> nn.Module:
    """A quantized conv with the weight grid of ``conv`` (zero-point-free int8) and float bias."""
    from torch.ao.nn.quantized import Conv2d as QConv2d

    if not isinstance(conv, QuantConv2d):
        raise LowbitsrError(f"{name}: expected a quantized conv, got {type(conv).__name__}")
    codes = weight_codes(conv)
    step, zero = codes.step_and_zero()
    grid = codes.codes.to(torch.int64) - zero
    if int(grid.abs().max()) > 127:
        raise LowbitsrError(f"{name}: weight grid does not fit int8")
    w_step = float(step) * post_scale
    qw = torch.quantize_per_tensor(grid.float() * w_step, w_step, 0, torch.qint8)
    q = QConv2d(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        bias=conv.bias is not None,
    )
    bias = None if conv.bias is None else conv.bias.detach().float() * post_scale
    q.set_weight_bias(qw, bias)
    q.scale, q.zero_point = out_q.step, out_q.zero
    return q


class TorchInt8SR(nn.Module):
    """An integer-layout EDSR on PyTorch's quantized kernels (built by :func:`to_torch_int8`).

    Forward: N×3×H×W float32 RGB in [0, rgb_range] → N×3×(sH)×(sW) float32 (not clamped), like
    the model it was built from. CPU only; runs under ``torch.no_grad``.
    """

    def __init__(self, model: EDSR) -> None:
        super().__init__()
        self.sub_mean, self.head, self.add_mean = model.sub_mean, model.head, model.add_mean
        self.model_config = dict(getattr(model, "model_config", {}) or {})
        self.rgb_range = float(getattr(model, "rgb_range", 255.0))
        blocks = [b for b in model.body if isinstance(b, QuantResBlock)]
        if not blocks or not all(b.integer for b in blocks):
            raise LowbitsrError(
                "to_torch_int8: needs a DDTB/PAMS EDSR in the integer layout (quant.layout: "
                "integer)"
            )
        self.last = model.body[len(blocks)]
        self.q1 = [_quant(b.quant_act1, f"body.{i}.quant_act1") for i, b in enumerate(blocks)]
        self.q2 = [
            _quant(b.quant_act2, f"body.{i}.quant_act2", relu=True) for i, b in enumerate(blocks)
        ]
        self.q3 = [_quant(b.quant_act3, f"body.{i}.quant_act3") for i, b in enumerate(blocks)]
        self.conv1 = nn.ModuleList()
        self.conv2 = nn.ModuleList()
        for i, b in enumerate(blocks):
            self.conv1.append(_qconv(b.body[0], self.q1[i], self.q2[i], 1.0, f"body.{i}.body.0"))
            self.conv2.append(
                _qconv(b.body[2], self.q2[i], self.q3[i], b.res_scale, f"body.{i}.body.2")
            )
        # tail: [QuantInputConv, PixelShuffle, ..., QuantInputConv(quant_out)]
        mods = [*model.tail[0], model.tail[1]]
        convs = [m for m in mods if isinstance(m, QuantInputConv)]
        if len(convs) < 2 or convs[-1].quant_out is None:
            raise LowbitsrError("to_torch_int8: the tail is not in the integer layout")
        self.tq = [_quant(m.quant_act, f"tail.{j}.quant_act") for j, m in enumerate(convs)]
        self.tq.append(_quant(convs[-1].quant_out, "tail.1.quant_out"))
        self.tconvs = nn.ModuleList(
            _qconv(m.conv, self.tq[j], self.tq[j + 1], 1.0, f"tail conv {j}")
            for j, m in enumerate(convs)
        )
        # the pixel shuffles right after each conv (they move the codes)
        self.shuffles: list[list[int]] = []
        for c in convs:
            after = []
            for m in mods[mods.index(c) + 1 :]:
                if not isinstance(m, nn.PixelShuffle):
                    break
                after.append(int(m.upscale_factor))
            self.shuffles.append(after)

    @torch.no_grad()
    def forward(self, lr: Tensor) -> Tensor:
        prev = torch.backends.quantized.engine
        torch.backends.quantized.engine = _ENGINE
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                return self._forward(lr.float().cpu())
        finally:
            torch.backends.quantized.engine = prev

    def _forward(self, lr: Tensor) -> Tensor:
        x = self.head(self.sub_mean(lr))
        add = torch.ops.quantized.add
        r = self.q1[0](x)
        n = len(self.conv1)
        for i in range(n):
            t = self.q2[i].clamp(self.conv1[i](r))
            t = self.q3[i].clamp(self.conv2[i](t))
            if i + 1 < n:
                nq = self.q1[i + 1]
                r = nq.clamp(add(t, r, nq.step, nq.zero))
            else:
                h = t.dequantize() + r.dequantize()
        feat = self.last(h) + x
        c = self.tq[0](feat)
        for j, conv in enumerate(self.tconvs):
            c = self.tq[j + 1].clamp(conv(c))
            for s in self.shuffles[j]:
                c = torch.pixel_shuffle(c, s)
        return self.add_mean(c.dequantize())


def to_torch_int8(model: nn.Module) -> TorchInt8SR:
    """Build the PyTorch int8 twin of an integer-layout DDTB/PAMS EDSR (eval, CPU copy).

    Raises:
        LowbitsrError: another architecture, layout or a gated/float quantizer.
    """
    import copy

    if not isinstance(model, EDSR):
        raise LowbitsrError(
            f"to_torch_int8: supports EDSR in the integer layout, got {type(model).__name__}"
        )
    m = copy.deepcopy(model).cpu().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # quantized tensors are deprecated
        return TorchInt8SR(m).eval()


def torch_int8_parity(model: nn.Module, inputs: Any, peak: float = 255.0) -> list[dict[str, Any]]:
    """PyTorch fake-quant ``model`` against its :func:`to_torch_int8` twin on N×3×H×W float32
    arrays; rows as :func:`~lowbitsr.deploy.onnx_export.parity` with ``"runtime": "torch_int8"``."""
    from .onnx_export import runtime_parity

    twin = to_torch_int8(model)

    def run(x: Any) -> Any:
        return twin(torch.from_numpy(x)).numpy()

    return runtime_parity(model, run, inputs, peak, "torch_int8")
