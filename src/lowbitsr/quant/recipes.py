"""QAT recipes for DDTB and PAMS (docs/methods.md §1.6, §1.8): hooks for the shared training loop.

The ``quant:`` section of an experiment holds the method config (``method``, ``bits``, ...) and,
under ``recipe:``, how to train it::

    quant:
      method: ddtb
      bits: 2
      recipe: {bound_lr: 1.0e-2, kd_weight: 1000, gate_stage_iters: 4000, calib_batches: 1}

Schedule (DDTB, paper: 1000 iterations per epoch): calibration (dynamic-intensity statistics and
bound initialisation, no optimizer step) → first stage of ``gate_stage_iters`` iterations with
static bounds, gates computed but not applied and the loss ``+ mean_l mean(c_l**2)`` so every gate
starts as the identity → gates applied for the rest of the run. Loss:
``L1(sr, hr) + kd_weight * AT(feat_student, feat_teacher)``, teacher = the float model (frozen),
plus ``output_kd_weight * L1(sr, sr_teacher)`` when that weight is set (our addition, off by
default: the student is pulled towards the teacher's output, not only the HR image).
Adam with the bounds (or PAMS clipping values) at ``bound_lr``, everything else at ``train.lr``.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ExperimentConfig, from_dict
from ..errors import ConfigError
from ..losses import attention_transfer
from ..recipe import Recipe
from .apply import (
    bound_parameters,
    config_from_dict,
    config_to_dict,
    gate_regularizer,
    quantize,
    set_gates_applied,
)
from .calibrate import attach_gates, calibrate, gated_layer_names

__all__ = ["QATRecipe", "RecipeConfig", "split_quant_section"]


@dataclass(frozen=True)
class RecipeConfig:
    """How to train a quantized model (the ``quant.recipe`` section).

    Attributes:
        bound_lr: Adam learning rate of the quantizer bounds / clipping values (paper 1e-2).
        kd_weight: weight of the attention-transfer distillation term (paper 1000; 0 = off).
        gate_stage_iters: DDTB first-stage length in iterations (gates not applied,
            regulariser on); paper: epochs 2-5 = 4000 iterations.
        gate_reg_weight: weight of the gate regulariser during the first stage (paper 1).
        calib_batches: training batches used by :func:`lowbitsr.quant.calibrate`.
        output_kd_weight: weight of ``L1(sr, teacher(lr))``, output distillation (0 = off, the
            papers' recipe). Not in DDTB or PAMS: at short budgets on a small corpus it keeps
            the quantized student close to the function of its float teacher.
    """

    bound_lr: float = 1e-2
    kd_weight: float = 1000.0
    gate_stage_iters: int = 4000
    gate_reg_weight: float = 1.0
    calib_batches: int = 1
    output_kd_weight: float = 0.0

    def __post_init__(self) -> None:
        for key in ("bound_lr", "kd_weight", "gate_reg_weight", "output_kd_weight"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
                raise ConfigError(
                    f"quant.recipe.{key}: must be a number >= 0, got {v!r}; write e.g. "
                    f"'{key}: {RecipeConfig.__dataclass_fields__[key].default}'"
                )


def split_quant_section(section: Mapping[str, Any]) -> tuple[dict[str, Any], RecipeConfig]:
    """Split ``cfg.quant`` into (method config dict, :class:`RecipeConfig`)."""
    method = dict(section)
    recipe = method.pop("recipe", None) or {}
    return method, from_dict(RecipeConfig, recipe, prefix="quant.recipe.")


class QATRecipe(Recipe):
    """Quantization-aware training with distillation from the float teacher (DDTB and PAMS)."""

    def __init__(self, cfg: ExperimentConfig) -> None:
        super().__init__(cfg)
        method_dict, self.rc = split_quant_section(cfg.quant or {})
        if not cfg.model.init:
            raise ConfigError(
                f"{cfg.name}: quantization-aware training starts from trained float weights; "
                "set model.init to a checkpoint path or pretrained:NAME"
            )
        self.qcfg = config_from_dict(method_dict)
        self.teacher: nn.Module | None = None
        self.calibration: dict[str, Any] = {}
        self._gates_on: bool | None = None

    # ---------------------------------------------------------------------------- set-up
    def prepare(
        self,
        model: nn.Module,
        batches: Iterator[dict[str, Any]],
        resume_state: dict[str, Any] | None = None,
    ) -> nn.Module:
        self.teacher = copy.deepcopy(model).eval().requires_grad_(False)
        device = next(model.parameters()).device
        student = quantize(model, self.qcfg)
        if resume_state is not None:
            # same structure as when the checkpoint was written; its tensors are loaded next
            attach_gates(student, resume_state.get("gated", []))
            self.calibration = dict(resume_state)
        else:
            lrs = [next(batches)["lr"].to(device) for _ in range(self.rc.calib_batches)]
            summary = calibrate(student, lrs)
            self.calibration = {"gated": gated_layer_names(student), **_jsonable(summary)}
        return student

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        bounds = bound_parameters(model)
        ids = {id(p) for p in bounds}
        rest = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
        return [{"params": rest}, {"params": bounds, "lr": self.rc.bound_lr}]

    # ---------------------------------------------------------------------------- training
    def _set_stage(self, model: nn.Module, step: int) -> bool:
        gates_on = step >= self.rc.gate_stage_iters
        if gates_on != self._gates_on:
            set_gates_applied(model, gates_on)
            self._gates_on = gates_on
        return gates_on

    def loss(
        self, model: nn.Module, batch: dict[str, torch.Tensor], step: int
    ) -> tuple[torch.Tensor, dict[str, float]]:
        gates_on = self._set_stage(model, step)
        sr, feat = model.forward_features(batch["lr"])
        l1 = F.l1_loss(sr, batch["hr"])
        loss = l1
        logs = {"l1": float(l1.detach())}
        if self.rc.kd_weight > 0 or self.rc.output_kd_weight > 0:
            assert self.teacher is not None
            with torch.no_grad():
                if self.rc.output_kd_weight > 0:
                    sr_t, feat_t = self.teacher.forward_features(batch["lr"])
                else:  # the teacher's tail is not needed
                    sr_t, feat_t = None, self.teacher.features(batch["lr"])
            if self.rc.kd_weight > 0:
                kd = attention_transfer(feat, feat_t)
                loss = loss + self.rc.kd_weight * kd
                logs["kd"] = float(kd.detach())
            if sr_t is not None:
                okd = F.l1_loss(sr, sr_t)
                loss = loss + self.rc.output_kd_weight * okd
                logs["okd"] = float(okd.detach())
        if not gates_on and self.calibration.get("gated"):
            reg = gate_regularizer(model)
            loss = loss + self.rc.gate_reg_weight * reg
            logs["gate_reg"] = float(reg.detach())
        return loss, logs

    def state(self) -> dict[str, Any]:
        return self.calibration

    def selectable(self, step: int) -> bool:
        # a model from the first stage runs with its gates off; saved models run with them on
        return not self.calibration.get("gated") or step >= self.rc.gate_stage_iters

    def quant_dict(self) -> dict[str, Any]:
        d = config_to_dict(self.qcfg)
        d["gated_layers"] = list(self.calibration.get("gated", []))
        return d


def _jsonable(summary: Mapping[str, Any]) -> dict[str, Any]:
    """Keep the JSON-able scalars/lists of a calibration summary (for checkpoints and logs)."""
    out: dict[str, Any] = {}
    for k, v in summary.items():
        if isinstance(v, torch.Tensor):
            v = v.tolist()
        if isinstance(v, dict):
            v = {str(a): (b.tolist() if isinstance(b, torch.Tensor) else b) for a, b in v.items()}
        out[k] = v
    return out
