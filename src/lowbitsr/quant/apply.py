"""``quantize(model, config)``: the entry point that turns a float SR model into a quantized one.

A ``{config type -> transform}`` table (torchao style) picks the method; each transform swaps the
residual blocks for quantized wrappers (:mod:`lowbitsr.quant.layers`). :func:`dequantize` swaps
them back. The helpers below answer the trainer's questions (which parameters are bounds, which are
gates, the gate regulariser) without it knowing module types.

Typical use (docs/methods.md §1.6)::

    student = quantize(teacher, DDTBConfig(bits=2))       # teacher untouched (deep copy)
    calibrate(student, lr_batches)                         # gates chosen, bounds initialised
    set_gates_applied(student, False)                      # first stage: + gate_regularizer
    ...
    set_gates_applied(student, True)                       # second stage and inference
"""

from __future__ import annotations

import copy
import dataclasses
import types
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from .compat import adapt_state_dict
from .ddtb import DDTBConfig, ddtb_transform
from .granular_dq import GranularDQConfig, GranularDQModel, quantize_granular_dq
from .layers import (
    DDTBActQuant,
    DynamicGate,
    PAMSActQuant,
    QuantConv2d,
    QuantDenseLayer,
    QuantGFF,
    QuantInputConv,
    QuantRDB,
    QuantResBlock,
    QuantSRResBlock,
    architecture_of,
)
from .pams import PAMSConfig, pams_transform

__all__ = [
    "QuantConfig",
    "bound_parameters",
    "config_from_dict",
    "config_to_dict",
    "dequantize",
    "gate_parameters",
    "gate_regularizer",
    "is_quantized",
    "quant_scalars",
    "quantize",
    "quantized_convs",
    "quantizers",
    "set_gates_applied",
]

QuantConfig = DDTBConfig | PAMSConfig | GranularDQConfig


def _granular_dq_transform(model: nn.Module, config: GranularDQConfig) -> nn.Module:
    # Granular-DQ wraps the float model (its bit controller reads the head features)
    return quantize_granular_dq(model, config, inplace=True)


#: The transform of each config type. Adding a method = one entry here. A transform modifies
#: the model in place and returns None, or returns the (wrapping) model to use instead.
_TRANSFORMS: dict[type, Callable[[nn.Module, Any], nn.Module | None]] = {
    DDTBConfig: ddtb_transform,
    PAMSConfig: pams_transform,
    GranularDQConfig: _granular_dq_transform,
}
#: Methods whose models can load the DDTB authors' checkpoints (key remapping in compat.py).
_AUTHOR_LAYOUT_CONFIGS = (DDTBConfig, PAMSConfig)
_CONFIG_BY_METHOD: dict[str, type] = {cls.method: cls for cls in _TRANSFORMS}  # type: ignore[attr-defined]
# Keys a trainer may store beside the config that are not settings: the gated layers are a
# calibration result (the weights' gate tensors say the same thing and are what loading uses).
_METADATA_KEYS = ("gated_layers",)
_ACT_QUANTIZERS = (DDTBActQuant, PAMSActQuant)
_WRAPPERS = (
    QuantResBlock,
    QuantSRResBlock,
    QuantRDB,
    QuantDenseLayer,
    QuantGFF,
    QuantInputConv,
    QuantConv2d,
)


# ------------------------------------------------------------------------------------ configs
def config_to_dict(config: QuantConfig) -> dict[str, Any]:
    """Plain, JSON/YAML-able dict of a config, with a ``method`` key (inverse of
    :func:`config_from_dict`)."""
    if type(config) not in _TRANSFORMS:
        raise TypeError(f"not a quantization config: {type(config).__name__}")
    if hasattr(config, "to_dict"):
        return config.to_dict()
    return {"method": config.method, **dataclasses.asdict(config)}


def config_from_dict(d: Mapping[str, Any]) -> QuantConfig:
    """Build and validate a config from a plain dict such as a YAML ``quant:`` section.

    Args:
        d: ``{"method": "ddtb" | "pams", <field>: value, ...}``; missing fields take defaults.
            A ``gated_layers`` entry (written by the QAT recipe beside the weights) is accepted
            and ignored: loading the weights attaches the gates from their ``gate.*`` tensors.

    Raises:
        ConfigError: not a mapping, missing/unknown ``method``, an unknown key (named, with the
            allowed ones), or an invalid value.
    """
    if not isinstance(d, Mapping):
        raise ConfigError(
            f"quant: expected a mapping such as {{method: ddtb, bits: 2}}, got {type(d).__name__}"
        )
    methods = ", ".join(sorted(_CONFIG_BY_METHOD))
    if "method" not in d:
        raise ConfigError(f"quant: missing 'method'; write e.g. 'method: ddtb' (one of {methods})")
    method = d["method"]
    cls = _CONFIG_BY_METHOD.get(method) if isinstance(method, str) else None
    if cls is None:
        raise ConfigError(f"quant.method: unknown method {method!r}; use one of {methods}")
    if hasattr(cls, "from_dict"):
        return cls.from_dict(d)
    allowed = [f.name for f in dataclasses.fields(cls)]
    for key in d:
        if key != "method" and key not in allowed and key not in _METADATA_KEYS:
            raise ConfigError(
                f"quant.{key}: unknown key for method {method}; allowed keys: "
                f"method, {', '.join(allowed)}"
            )
    return cls(**{k: v for k, v in d.items() if k != "method" and k not in _METADATA_KEYS})


# ------------------------------------------------------------------------------------ transforms
def is_quantized(model: nn.Module) -> bool:
    """Whether ``model`` already holds quantized layers of this package."""
    quantized = (*_ACT_QUANTIZERS, QuantConv2d, GranularDQModel)
    return any(isinstance(m, quantized) for m in model.modules())


def quantize(model: nn.Module, config: QuantConfig, *, inplace: bool = False) -> nn.Module:
    """Quantize a float EDSR / RDN / SRResNet with DDTB or PAMS (docs/methods.md §1.5, §1.8).

    Args:
        model: a float model from :func:`lowbitsr.models.create_model` (any device and mode).
        config: :class:`~lowbitsr.quant.ddtb.DDTBConfig` or
            :class:`~lowbitsr.quant.pams.PAMSConfig`.
        inplace: modify ``model`` itself instead of a deep copy (default: copy, so the float
            model can serve as the distillation teacher; the copy shares no tensor with it).

    Returns:
        The quantized model. It keeps ``forward(lr) -> sr`` (same shapes and ranges as the float
        model) and ``forward_features``, gains ``quant_config_dict`` (= ``config_to_dict``),
        a copy of ``model_config``, and an ``adapt_state_dict(sd)`` method that
        :func:`lowbitsr.models.load_weights` uses (our checkpoints and the DDTB authors').
        Activation quantizers start uncalibrated (DDTB bounds ±10, PAMS alpha 10, no gates): run
        :func:`~lowbitsr.quant.calibrate.calibrate` or load a checkpoint next.

    Raises:
        TypeError: ``config`` is not a quantization config.
        ConfigError: the model is already quantized, or its architecture is unsupported
            (:class:`~lowbitsr.quant.layers.UnsupportedModelError`, also a TypeError).
    """
    transform = _TRANSFORMS.get(type(config))
    if transform is None:
        known = ", ".join(cls.__name__ for cls in _TRANSFORMS)
        raise TypeError(
            f"quantize: config must be one of {known}, got {type(config).__name__}; build one "
            "with config_from_dict({'method': 'ddtb', 'bits': 2})"
        )
    architecture_of(model)  # fail before copying a model we cannot handle
    if is_quantized(model):
        raise ConfigError(
            f"quantize: this {type(model).__name__} is already quantized "
            f"({getattr(model, 'quant_config_dict', {}).get('method', '?')}); pass the float "
            "model, or call dequantize() first"
        )
    out = model if inplace else copy.deepcopy(model)
    out = transform(out, config) or out
    _annotate_activation_bits(out, config)
    out.quant_config_dict = config_to_dict(config)
    cfg = getattr(model, "model_config", None)
    if isinstance(cfg, Mapping):
        out.model_config = dict(cfg)
    if isinstance(config, _AUTHOR_LAYOUT_CONFIGS):  # maps the DDTB authors' checkpoint keys
        out.adapt_state_dict = types.MethodType(adapt_state_dict, out)
    return out


def _annotate_activation_bits(model: nn.Module, config: QuantConfig) -> None:
    """Give every static quantized conv the ``a_bits`` of its input, for BitOPs accounting.

    The input of a body conv is quantized to ``config.bits``, except EDSR's conv1, which sees the
    unquantized block input in the PAMS/DDTB layout (§1.5) and so multiplies k-bit weights by
    float activations (counted as 32 bits). Gate convs use 2-bit activations and weights.
    Granular-DQ layers report their per-sample bits themselves.
    """
    bits = getattr(config, "bits", None)
    if bits is None:
        return
    for module in model.modules():
        if isinstance(module, DynamicGate):
            for conv in (module.conv1, module.conv2):
                conv.a_bits = module.bits
        elif isinstance(module, QuantConv2d) and not hasattr(module, "a_bits"):
            module.a_bits = bits
    for module in model.modules():
        if isinstance(module, QuantResBlock):  # conv1 reads x (paper) or QA1(x) (integer)
            module.body[0].a_bits = module.quant_act1.bits if module.integer else 32


def _to_float_children(module: nn.Module) -> None:
    for name, child in list(module.named_children()):
        if isinstance(child, _WRAPPERS):
            setattr(module, name, child.to_float())
        else:
            _to_float_children(child)


def dequantize(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Swap every quantized block back to its float form (same weight tensors), dropping the
    quantizers, gates and the attributes :func:`quantize` added. Deep-copies unless ``inplace``."""
    out = model if inplace else copy.deepcopy(model)
    _to_float_children(out)
    for attr in ("quant_config_dict", "adapt_state_dict"):
        out.__dict__.pop(attr, None)
    return out


# ------------------------------------------------------------------------------------ queries
def quantizers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Activation quantizers (DDTB or PAMS) as ``(qualified name, module)``, in forward order
    (module registration order, which the wrappers keep equal to the order of execution)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _ACT_QUANTIZERS)]


def quantized_convs(model: nn.Module) -> list[tuple[str, QuantConv2d]]:
    """Weight-quantized convs of the network body (the gates' own 1×1 convs excluded)."""
    gate_convs = {id(m) for g in model.modules() if isinstance(g, DynamicGate) for m in g.modules()}
    return [
        (n, m)
        for n, m in model.named_modules()
        if isinstance(m, QuantConv2d) and id(m) not in gate_convs
    ]


def bound_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The clipping parameters: DDTB ``lower``/``upper`` and PAMS ``alpha`` (lr 1e-2, §1.6)."""
    params: list[nn.Parameter] = []
    for _, q in quantizers(model):
        if isinstance(q, DDTBActQuant):
            params += [q.lower, q.upper]
        else:
            params.append(q.alpha)
    return params


def gate_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters of every dynamic gate (convs and BN affine; lr as the weights, §1.6)."""
    return [p for m in model.modules() if isinstance(m, DynamicGate) for p in m.parameters()]


def set_gates_applied(model: nn.Module, applied: bool) -> None:
    """Apply the gates (second stage, inference) or only compute them (first stage, §1.6)."""
    for _, q in quantizers(model):
        if isinstance(q, DDTBActQuant):
            q.gate_applied = bool(applied)


def gate_regularizer(model: nn.Module) -> Tensor:
    """First-stage gate loss (§1.6): mean over gated layers of ``mean(c**2)`` of the logits of
    the last forward. A 0-dim tensor; ``0.`` (on the model's device) when no gate ran."""
    terms = [
        (q.last_logits**2).mean()
        for _, q in quantizers(model)
        if isinstance(q, DDTBActQuant) and q.last_logits is not None
    ]
    if not terms:
        ref = next(model.parameters(), None)
        return torch.zeros((), device=ref.device if ref is not None else None)
    return torch.stack(terms).mean()


@torch.no_grad()
def quant_scalars(model: nn.Module) -> dict[str, float]:
    """Scalars that show a quantized model's state, for TensorBoard (empty for float models).

    - DDTB: ``bounds/<layer>/lower`` and ``.../upper``; for each gate that ran in the last
      forward, ``gate/<layer>/upper_mult`` and ``.../lower_mult`` = batch mean of
      ``2·sigmoid(c)`` (1 = the static bounds).
    - PAMS: ``alpha/<layer>``.
    - Granular-DQ: ``fab`` of the last forward and ``bits_frac/<b>`` (share of patches at ``b``).
    """
    out: dict[str, float] = {}
    for name, q in quantizers(model):
        if isinstance(q, DDTBActQuant):
            out[f"bounds/{name}/lower"] = float(q.lower.detach().float()[0])
            out[f"bounds/{name}/upper"] = float(q.upper.detach().float()[0])
            if q.last_logits is not None:
                mult = (2 * torch.sigmoid(q.last_logits.detach().float())).mean(0).flatten()
                out[f"gate/{name}/upper_mult"] = float(mult[0])
                out[f"gate/{name}/lower_mult"] = float(mult[1])
        elif isinstance(q, PAMSActQuant):
            out[f"alpha/{name}"] = float(q.alpha.detach().float()[0])
    bits = getattr(model, "last_bits", None)
    if isinstance(bits, Tensor) and bits.numel():
        b = bits.detach().float().flatten()
        out["fab"] = float(b.mean())
        for v in sorted({int(x) for x in b.tolist()}):
            out[f"bits_frac/{v}"] = float((b == v).float().mean())
    return out
