"""The Granular-DQ training recipe (:class:`GranularDQRecipe`, docs/methods.md §2.4) for the
shared training loop.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from ...recipe import Recipe
from ..bitops import fab
from .config import GranularDQConfig
from .model import GranularDQModel, calibrate_granular_dq, quantize_granular_dq
from .tables import EntropyTable, compute_entropy_table, save_entropy_table

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
