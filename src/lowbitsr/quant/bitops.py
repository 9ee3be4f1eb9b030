"""BitOPs and FAB (feature average bit-width) of float and quantized SR models.

Protocol: docs/evaluation.md §4 (FAB) and §5 (BitOPs).

BitOPs: for every ``nn.Conv2d`` and ``nn.Linear`` that runs in a forward pass,
``MACs x w_bits x a_bits / 64``, summed; layers in full precision count 32 x 32 (so an FP
layer's BitOPs equal its MACs x 16). FAB: the mean activation bit-width of the quantized layers,
over tiles/samples (and then images); a model without quantized layers reports 32.

Bit-width contract for quantized layers (any method): a conv or linear module that carries

* ``w_bits``: ``int``, its weight bit-width, and
* ``a_bits``: ``int`` (the same for every sample) or a ``[N]`` tensor of per-sample bit-widths
  (Granular-DQ's :class:`~lowbitsr.quant.gdq_layers.GDQConv2d`), read right after the layer's
  forward (so a per-forward value is current), and None for "not quantized"

is counted at those bits; a module without both attributes (or with ``a_bits`` None) is FP.
DDTB/PAMS ``QuantConv2d`` layers only need to expose the two attributes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["BITOPS_FORMULA", "count_bitops", "fab"]

FP_BITS = 32
BITOPS_FORMULA = "sum over convs MACs*w_bits*a_bits/64; FP layers 32x32"


def fab(bits_per_tile: Tensor | Sequence[float] | None) -> float:
    """Feature average bit-width: the mean bit-width over tiles (docs/evaluation.md §4).

    Args:
        bits_per_tile: the bit-width of each tile/patch (any shape, e.g. the ``[rows, cols]``
            bit map of :func:`~lowbitsr.quant.granular_dq.gdq_super_resolve` or a model's
            ``last_bits``); None for a model without quantized layers.

    Returns:
        The mean as a float; 32.0 for None (a float model).
    """
    if bits_per_tile is None:
        return float(FP_BITS)
    t = torch.as_tensor(bits_per_tile, dtype=torch.float64)
    if t.numel() == 0:
        raise ValueError("fab: no tiles given; pass at least one bit-width (or None for FP)")
    return float(t.mean())


def _layer_bits(module: nn.Module, n: int) -> tuple[float, Tensor | None]:
    """``(w_bits, a_bits [n] or None)``; None = full precision."""
    w = getattr(module, "w_bits", None)
    a = getattr(module, "a_bits", None)
    if w is None or a is None:
        return float(FP_BITS), None
    a_t = torch.as_tensor(a.detach().cpu() if isinstance(a, Tensor) else a, dtype=torch.float64)
    return float(w), a_t.expand(n) if a_t.dim() == 0 else a_t.flatten()


@torch.no_grad()
def count_bitops(
    model: nn.Module,
    input_shape: Sequence[int] = (1, 3, 64, 64),
    bits_per_layer: Mapping[str, tuple[int, int]] | None = None,
    *,
    lr: Tensor | None = None,
) -> dict[str, Any]:
    """Count MACs, BitOPs and FAB of one forward pass (forward hooks on convs and linears).

    For each ``nn.Conv2d`` (``MACs = N * C_out * H_out * W_out * C_in / groups * kH * kW``) and
    ``nn.Linear`` (``MACs = rows * in * out``) the bits are, in order of precedence:
    ``bits_per_layer[name]`` (``(w_bits, a_bits)``), the module's ``w_bits``/``a_bits``
    (see the module docstring; per-sample ``a_bits`` weight each sample's MACs), else 32 x 32.

    The model runs in eval mode (restored afterwards). Content matters for dynamic models
    (Granular-DQ picks bits from the input), so pass the real ``lr`` when you have it; otherwise
    a fixed-seed uniform random input in ``[0, 255]`` of ``input_shape`` is used.

    Args:
        model: any module mapping ``[N, 3, H, W]`` to an output.
        input_shape: input shape when ``lr`` is None.
        bits_per_layer: overrides by module name (``dict(model.named_modules())`` keys).
        lr: the input to count on (its shape wins over ``input_shape``).

    Returns:
        ``{"bitops", "gbitops", "macs", "formula", "fab", "layers"}``: totals for the whole
        batch (floats), the formula string, FAB (mean activation bits over quantized layers and
        samples; 32.0 if none is quantized) and per-layer rows
        ``{"name", "type", "macs", "w_bits", "a_bits", "bitops"}`` (``a_bits`` averaged over the
        batch).
    """
    overrides = dict(bits_per_layer or {})
    names = {m: name for name, m in model.named_modules()}
    unknown = sorted(set(overrides) - set(names.values()))
    if unknown:
        raise ValueError(f"bits_per_layer names no module: {unknown}; use named_modules() keys")
    rows: list[dict[str, Any]] = []
    q_bits: list[Tensor] = []

    def hook(module: nn.Module, inputs: tuple[Any, ...], output: Tensor) -> None:
        x = inputs[0]
        if isinstance(module, nn.Conv2d):
            n, c_out, h_out, w_out = output.shape
            kh, kw = module.kernel_size
            per_sample = c_out * h_out * w_out * (module.in_channels // module.groups) * kh * kw
        else:  # nn.Linear: every leading dim is a "row"
            n = x.shape[0] if x.dim() > 1 else 1
            per_sample = (x.numel() // max(n, 1)) // module.in_features
            per_sample *= module.in_features * module.out_features
        name = names.get(module, "?")
        if name in overrides:
            w_bits, a = overrides[name]
            w_bits_f, a_bits = float(w_bits), torch.full((n,), float(a), dtype=torch.float64)
            quantized = True
        else:
            w_bits_f, a_bits_opt = _layer_bits(module, n)
            quantized = a_bits_opt is not None
            a_bits = (
                a_bits_opt
                if a_bits_opt is not None
                else torch.full((n,), float(FP_BITS), dtype=torch.float64)
            )
        if a_bits.numel() != n:
            raise ValueError(f"{name}: a_bits has {a_bits.numel()} entries for a batch of {n}")
        bitops = float(per_sample * w_bits_f * a_bits.sum() / 64.0)
        if quantized:
            q_bits.append(a_bits)
        rows.append(
            {
                "name": name,
                "type": type(module).__name__,
                "macs": float(per_sample * n),
                "w_bits": w_bits_f,
                "a_bits": float(a_bits.mean()),
                "bitops": bitops,
            }
        )

    handles = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if isinstance(m, (nn.Conv2d, nn.Linear))
    ]
    was_training = model.training
    try:
        model.eval()
        if lr is None:
            ref = next(iter(model.parameters()), None)
            device = ref.device if ref is not None else torch.device("cpu")
            gen = torch.Generator().manual_seed(0)
            lr = (torch.rand(tuple(input_shape), generator=gen) * 255.0).to(device)
        model(lr)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    total = sum(r["bitops"] for r in rows)
    macs = sum(r["macs"] for r in rows)
    fab_value = fab(torch.cat(q_bits)) if q_bits else float(FP_BITS)
    return {
        "bitops": total,
        "gbitops": total / 1e9,
        "macs": macs,
        "formula": BITOPS_FORMULA,
        "fab": fab_value,
        "layers": rows,
    }
