"""The interface between a training method and the training loop: :class:`Recipe`.

A recipe says what a method adds to the shared loop of :mod:`lowbitsr.train` (the model to
train, its losses, parameter groups and checkpointed state). It lives below both the loop and
the quantization methods, so that :mod:`lowbitsr.quant` implements recipes without importing
the loop, and the loop runs any recipe without knowing the methods.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from .config import ExperimentConfig

__all__ = ["FloatRecipe", "Recipe"]


class Recipe:
    """What a training method adds to the loop: the trained model, its losses and parameter groups.

    Subclasses (:class:`FloatRecipe` here; DDTB/PAMS/Granular-DQ in :mod:`lowbitsr.quant`)
    override the hooks; the loop itself (data, optimizer, checkpoints, validation, logging) is
    shared.
    """

    #: whether some parameters may go unused in a training step (DistributedDataParallel must
    #: then search the graph every step), e.g. Granular-DQ's quantizers of the bits not drawn
    ddp_find_unused_parameters: bool = False

    def __init__(self, cfg: ExperimentConfig) -> None:
        self.cfg = cfg

    def prepare(
        self,
        model: nn.Module,
        batches: Iterator[dict[str, Any]],
        resume_state: dict[str, Any] | None = None,
    ) -> nn.Module:
        """Return the model to train (e.g. the quantized student).

        Args:
            model: the float model (``init`` weights loaded), on the training device.
            batches: an endless stream of training batches (``{"lr", "hr", "name"}``, on CPU)
                reserved for calibration; consuming it does not shift the training data.
            resume_state: on resume, the dict :meth:`state` returned when the checkpoint was
                written. The recipe must rebuild the same module structure (e.g. which layers
                carry gates) without calibrating; the checkpoint's tensors are loaded afterwards.
        """
        return model

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        """Optimizer parameter groups (default: every trainable parameter at ``train.lr``)."""
        return [{"params": [p for p in model.parameters() if p.requires_grad]}]

    def loss(
        self, model: nn.Module, batch: dict[str, torch.Tensor], step: int
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss of one batch and scalars to log."""
        sr = model(batch["lr"])
        loss = F.l1_loss(sr, batch["hr"])
        return loss, {"l1": float(loss.detach())}

    def state(self) -> dict[str, Any]:
        """JSON-able recipe state saved in checkpoints (e.g. calibration done)."""
        return {}

    def selectable(self, step: int) -> bool:
        """Whether the model after ``step`` may be kept as the best one (e.g. not mid-schedule)."""
        return True

    def quant_dict(self) -> dict[str, Any] | None:
        """Plain-dict quantization config saved beside the weights (None for float models)."""
        return None


class FloatRecipe(Recipe):
    """Plain L1 training of a float model."""
