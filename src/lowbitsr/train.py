"""The training loop's former home, kept so ``from lowbitsr.train import ...`` keeps working.

The code is in :mod:`lowbitsr.training` (the loop in :mod:`lowbitsr.training.loop`, the run
folder and resuming in :mod:`lowbitsr.training.rundir`) and the recipe interface in
:mod:`lowbitsr.recipe`.
"""

from __future__ import annotations

from .training import (
    RESUMABLE_KEYS,
    RUN_FILES,
    FloatRecipe,
    Recipe,
    ResumableSampler,
    TrainResult,
    build_model,
    check_model_config,
    train,
)

__all__ = [
    "RESUMABLE_KEYS",
    "RUN_FILES",
    "FloatRecipe",
    "Recipe",
    "ResumableSampler",
    "TrainResult",
    "build_model",
    "check_model_config",
    "train",
]
