"""Training: the shared loop (:mod:`.loop`), the run folder and resuming (:mod:`.rundir`).

The recipes a method plugs into the loop implement :class:`lowbitsr.recipe.Recipe` (float
training: :class:`~lowbitsr.recipe.FloatRecipe`; DDTB/PAMS and Granular-DQ in
:mod:`lowbitsr.quant`); saved models and training checkpoints are :mod:`lowbitsr.checkpoint`,
several processes :mod:`lowbitsr.distributed`.
"""

from __future__ import annotations

from ..recipe import FloatRecipe, Recipe
from .loop import ResumableSampler, TrainResult, build_model, check_model_config, train
from .rundir import RESUMABLE_KEYS, RUN_FILES

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
