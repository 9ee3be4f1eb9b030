"""Loading checkpoints into quantized models: our own layout and the DDTB authors' layout.

:func:`~lowbitsr.quant.apply.quantize` installs :func:`adapt_state_dict` as the quantized model's
``adapt_state_dict(sd)`` method; :func:`lowbitsr.models.load_weights` calls it before checking
keys. It

1. renames the DDTB authors' keys (``zysxmu/DDTB``: ``DDTB_EDSR``, ``DDTB_RDN``, ``bnsrresnet``)
   into ours when the file is in their layout (docs/methods.md §1.5), and
2. attaches a :class:`~lowbitsr.quant.layers.DynamicGate` to every quantizer the file says is
   gated (their ``is_dynamic`` flag, or our ``gate.*`` keys) and removes it from the others —
   loading decides which layers are gated, so no calibration pass is needed after it.

Official → ours, per activation quantizer (prefix ``P``, see the per-architecture tables below)::

    P.alpha_lower, P.alpha_upper      -> Q.lower, Q.upper
    P.atten_c.1.weight                -> Q.gate.conv1.weight   (C -> 32, ternary)
    P.atten_c.2.{weight,bias,running_mean,running_var,num_batches_tracked} -> Q.gate.bn.*
    P.atten_c.5.weight                -> Q.gate.conv2.weight   (32 -> 2, ternary)
    P.is_dynamic                      -> (read: nonzero = gated), dropped
    P.max_val, P.min_val              -> dropped (unused at inference)

Gate tensors of static layers (their code builds a gate for every quantizer) are dropped.

========================================  ============================================
their key                                 ours
========================================  ============================================
EDSR ``body.i.body.0.*`` / ``body.3.*``    ``body.i.body.0.*`` / ``body.i.body.2.*``
EDSR ``body.i.body.2.*``                   duplicate of ``body.i.quant_act2.*``: checked, dropped
EDSR ``body.i.quant_act{1,2,3}``           ``body.i.quant_act{1,2,3}``
SRResNet ``residual.i.act{1,2}``           ``residual.i.quant_act{1,2}``
RDN ``RDBs.i.act{1,2}``                    ``RDBs.i.quant_act{1,2}``
RDN ``RDBs.i.convs.j.act`` (j ≥ 1)         ``RDBs.i.convs.j.quant_act``
RDN ``RDBs.i.convs.0.act``                 never run by their forward: dropped
RDN ``act``                                ``GFF.quant_act``
========================================  ============================================

All other keys (convs, BN, head, tail, mean shifts) are the same in both layouts.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from ..errors import CheckpointError
from .layers import DDTBActQuant, architecture_of

__all__ = ["adapt_state_dict", "from_official", "is_official_layout"]

_QUANT_SUFFIX = {"alpha_lower": "lower", "alpha_upper": "upper"}
_GATE_SUFFIX = {"atten_c.1.": "gate.conv1.", "atten_c.2.": "gate.bn.", "atten_c.5.": "gate.conv2."}
_DROPPED_SUFFIX = ("max_val", "min_val", "is_dynamic")

# (their quantizer prefix pattern, our prefix template) per architecture.
_PREFIXES: dict[str, list[tuple[re.Pattern[str], str]]] = {
    "edsr": [(re.compile(r"^(body\.\d+)\.quant_act([123])\."), r"\1.quant_act\2.")],
    "srresnet": [(re.compile(r"^(residual\.\d+)\.act([12])\."), r"\1.quant_act\2.")],
    "rdn": [
        (re.compile(r"^(RDBs\.\d+)\.act([12])\."), r"\1.quant_act\2."),
        (re.compile(r"^(RDBs\.\d+\.convs\.\d+)\.act\."), r"\1.quant_act."),
        (re.compile(r"^act\."), "GFF.quant_act."),
    ],
}
_EDSR_CONV2 = re.compile(r"^(body\.\d+)\.body\.3\.")
_EDSR_DUP_ACT2 = re.compile(r"^(body\.\d+)\.body\.2\.")
_RDN_UNUSED_ACT = re.compile(r"^RDBs\.\d+\.convs\.0\.act\.")


def is_official_layout(state_dict: Mapping[str, Tensor]) -> bool:
    """Whether ``state_dict`` comes from the DDTB authors' code (``alpha_lower`` etc.)."""
    return any(k.endswith((".alpha_lower", ".alpha_upper", ".is_dynamic")) for k in state_dict)


def _split_quantizer_key(key: str, arch: str) -> tuple[str, str] | None:
    """``(our quantizer prefix with trailing dot, their sub-key)`` or None."""
    for pattern, template in _PREFIXES[arch]:
        m = pattern.match(key)
        if m:
            return m.expand(template), key[m.end() :]
    return None


def _undup_edsr(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    # Their quant_act2 is also registered as body.2 of the block's Sequential, so each of its
    # tensors is saved twice. Keep one copy (under the quant_act2 name) after checking they agree.
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        m = _EDSR_DUP_ACT2.match(key)
        if m is None:
            out.setdefault(key, value)
            continue
        original_key = f"{m.group(1)}.quant_act2.{key[m.end() :]}"
        original = state_dict.get(original_key)
        if original is None:
            out[original_key] = value
        elif original.shape != value.shape or not torch.equal(original, value):
            raise CheckpointError(
                f"official EDSR checkpoint: '{key}' should duplicate '{original_key}' but "
                "differs; the file is inconsistent"
            )
    return out


def from_official(
    state_dict: Mapping[str, Tensor], arch: str
) -> tuple[dict[str, Tensor], set[str]]:
    """Rename a DDTB-authors state dict into our layout.

    Args:
        state_dict: canonical flat dict (wrappers such as ``{'state_dict': ...}`` already removed).
        arch: ``"edsr"``, ``"rdn"`` or ``"srresnet"``.

    Returns:
        ``(renamed state dict, names of the gated quantizers)`` (names without trailing dot, e.g.
        ``"body.3.quant_act2"``). Unrecognised keys pass through so a strict load reports them.

    Raises:
        CheckpointError: an EDSR ``body.i.body.2.*`` tensor differs from the ``quant_act2`` tensor
            it should duplicate.
    """
    src = _undup_edsr(state_dict) if arch == "edsr" else dict(state_dict)
    out: dict[str, Tensor] = {}
    gated: set[str] = set()
    gate_tensors: dict[str, dict[str, Tensor]] = {}
    for key, value in src.items():
        if arch == "edsr" and (m := _EDSR_CONV2.match(key)):
            out[f"{m.group(1)}.body.2.{key[m.end() :]}"] = value
            continue
        if arch == "rdn" and _RDN_UNUSED_ACT.match(key):
            continue
        split = _split_quantizer_key(key, arch)
        if split is None:
            out[key] = value
            continue
        prefix, sub = split
        if sub == "is_dynamic":
            if bool((value != 0).any()):
                gated.add(prefix[:-1])
            continue
        if sub in _DROPPED_SUFFIX:
            continue
        if sub in _QUANT_SUFFIX:
            out[prefix + _QUANT_SUFFIX[sub]] = value.reshape(1)
            continue
        for theirs, ours in _GATE_SUFFIX.items():
            if sub.startswith(theirs):
                gate_tensors.setdefault(prefix, {})[ours + sub[len(theirs) :]] = value
                break
        else:
            out[prefix + sub] = value
    for prefix, tensors in gate_tensors.items():
        if prefix[:-1] in gated:
            for sub, value in tensors.items():
                out[prefix + sub] = value
    return out, gated


def adapt_state_dict(model: nn.Module, state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Make ``state_dict`` loadable into the quantized ``model`` (installed by ``quantize``).

    Renames the DDTB authors' layout (see the module docstring) and attaches / removes gates so
    that the model's gated layers are exactly those the file describes: a quantizer whose bounds
    are in the file is gated iff the file has its gate. Quantizers whose bounds are absent are
    left alone (e.g. a partial, non-strict load). Returns a new dict; ``model`` is modified only
    in its set of gates.
    """
    arch = architecture_of(model)
    if is_official_layout(state_dict):
        sd, gated = from_official(state_dict, arch)
    else:
        sd = dict(state_dict)
        gated = {k[: -len(".gate.conv1.weight")] for k in sd if k.endswith(".gate.conv1.weight")}
    for name, module in model.named_modules():
        if not isinstance(module, DDTBActQuant) or f"{name}.lower" not in sd:
            continue
        if name in gated and module.gate is None:
            module.add_gate()
        elif name not in gated and module.gate is not None:
            module.remove_gate()
    return sd
