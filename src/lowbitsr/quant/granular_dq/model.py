"""The Granular-DQ model wrapper and the module swap (:func:`quantize_granular_dq`,
:class:`GranularDQModel` with its bit controller) and the LSQ lazy calibration.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..gdq_layers import (
    BitContext,
    EntropyToBit,
    GDQConv2d,
    GranularBitController,
)
from .config import GranularDQConfig
from .rate import rate_controlled_choice
from .tables import EntropyTable


@dataclass(frozen=True)
class _ArchSpec:
    """Where Granular-DQ plugs into one float architecture."""

    head_attr: str  # the module whose output is Z1 (wrapped to feed the controller)
    pre_head: Callable[[nn.Module, Tensor], Tensor]  # network input -> head input
    targets: Callable[[nn.Module], list[tuple[nn.Module, str, nn.Conv2d]]]  # body convs


def _edsr_targets(net: nn.Module) -> list[tuple[nn.Module, str, nn.Conv2d]]:
    from ...models.edsr import ResBlock

    out = []
    for block in net.body:
        if isinstance(block, ResBlock):
            out += [(block.body, "0", block.body[0]), (block.body, "2", block.body[2])]
    return out


def _rdn_targets(net: nn.Module) -> list[tuple[nn.Module, str, nn.Conv2d]]:
    out: list[tuple[nn.Module, str, nn.Conv2d]] = []
    for rdb in net.RDBs:
        out += [(layer.conv, "0", layer.conv[0]) for layer in rdb.convs]
        out.append((rdb, "LFF", rdb.LFF))
    return out


def _srresnet_targets(net: nn.Module) -> list[tuple[nn.Module, str, nn.Conv2d]]:
    out = []
    for block in net.residual:
        out += [(block, "conv1", block.conv1), (block, "conv2", block.conv2)]
    return out


def _arch_spec(net: nn.Module) -> tuple[str, _ArchSpec]:
    from ...models import EDSR, RDN, SRResNet

    if isinstance(net, EDSR):
        return "edsr", _ArchSpec("head", lambda m, x: m.sub_mean(x), _edsr_targets)
    if isinstance(net, RDN):
        return "rdn", _ArchSpec("SFENet1", lambda m, x: x, _rdn_targets)
    if isinstance(net, SRResNet):
        # Z1 = the 9x9 conv output before PReLU, as the released SRResNet code feeds its gate.
        return "srresnet", _ArchSpec("conv_input", lambda m, x: x, _srresnet_targets)
    raise TypeError(
        f"Granular-DQ supports lowbitsr's EDSR, RDN and SRResNet models, got "
        f"{type(net).__name__}; build the float model with lowbitsr.create_model(...)."
    )


class _HeadTap(nn.Module):
    """The float head, then the bit controller on its output ``Z1`` (docs/methods.md §2.1).

    The controller is owned by :class:`GranularDQModel`; it is referenced here without being
    registered, so it appears once in ``state_dict`` and ``print(model)``.
    """

    def __init__(self, inner: nn.Module, ctx: BitContext, controller: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.ctx = ctx
        self.__dict__["_controller"] = controller

    def forward(self, x: Tensor) -> Tensor:
        z1 = self.inner(x)
        self.__dict__["_controller"](z1, self.ctx)
        return z1

    def extra_repr(self) -> str:
        return "output feeds the Granular-DQ bit controller"


class GranularDQModel(nn.Module):
    """A float SR model quantized with Granular-DQ (build it with :func:`quantize_granular_dq`).

    ``forward(lr) -> sr`` and ``forward_features(lr) -> (sr, feat)`` keep the float model's
    contract (``lr``: ``[N, 3, H, W]`` RGB in ``[0, rgb_range]``; ``sr``: ``[N, 3, sH, sW]``, not
    clamped). Each sample of the batch is one patch with its own bit-width, chosen from its head
    features (GBC) and its entropy (E2B) and used by every quantized layer.

    Attributes:
        net: the float architecture with its body convs swapped for ``GDQConv2d``.
        controller: the :class:`~.gdq_layers.GranularBitController` (GBC, E2B, ATC).
        ctx: the shared :class:`~.gdq_layers.BitContext`.
        config: the :class:`GranularDQConfig` it was built from.
        last_bits: ``[N]`` int64 bit-widths of the last forward (for FAB), or None.
        model_config, scale, rgb_range: copied from the float model.
    """

    def __init__(
        self,
        net: nn.Module,
        controller: GranularBitController,
        ctx: BitContext,
        config: GranularDQConfig,
        arch: str,
    ) -> None:
        super().__init__()
        self.net = net
        self.controller = controller
        self.ctx = ctx
        self.config = config
        self.arch = arch
        self.scale = int(getattr(net, "scale", 1))
        self.rgb_range = float(getattr(net, "rgb_range", 255.0))
        if hasattr(net, "model_config"):
            self.model_config = dict(net.model_config)
        self.last_bits: Tensor | None = None

    # ---- forward ------------------------------------------------------------------------
    def forward_features(self, lr: Tensor) -> tuple[Tensor, Tensor]:
        """``(sr, feat)`` as the float model's ``forward_features``; sets :attr:`last_bits`."""
        ctx = self.ctx
        ctx.clear()
        ctx.lr, ctx.rgb_range = lr, self.rgb_range
        try:
            sr, feat = self.net.forward_features(lr)
            self.last_bits = None if ctx.bits is None else ctx.bits.detach()
        finally:
            ctx.clear()  # drop the selection (and its autograd graph) after the pass
        return sr, feat

    def forward(self, lr: Tensor) -> Tensor:
        """``[N, 3, H, W]`` in ``[0, rgb_range]`` -> ``[N, 3, sH, sW]``, not clamped."""
        return self.forward_features(lr)[0]

    @torch.no_grad()
    def decide_bits(self, lr: Tensor) -> Tensor:
        """The bit-width each patch of ``lr`` ``[N, 3, H, W]`` would get (head + controller only).

        Returns ``[N]`` int64. In eval mode with the default learned gate this is deterministic
        and equals what ``forward`` uses; with a random or official gate call it once and pass
        the result to :meth:`force_bits`.
        """
        with self._head_pass(lr) as (spec, ctx):
            getattr(self.net, spec.head_attr)(spec.pre_head(self.net, lr))
            assert ctx.bits is not None
            return ctx.bits.clone()

    @contextlib.contextmanager
    def _head_pass(self, lr: Tensor) -> Iterator[tuple[_ArchSpec, BitContext]]:
        """The bit context set up for a head-only pass over ``lr``, cleared afterwards."""
        _, spec = _arch_spec(self.net)
        ctx = self.ctx
        ctx.clear()
        ctx.lr, ctx.rgb_range = lr, self.rgb_range
        try:
            yield spec, ctx
        finally:
            ctx.clear()

    @torch.no_grad()
    def gate_logits(self, lr: Tensor) -> Tensor:
        """The learned GBC's logits ``[N, len(gbc_bits)]`` for the patches ``lr`` ``[N, 3, H, W]``
        (head + GBC, no selection); a random or fixed gate has none (RuntimeError)."""
        with self._head_pass(lr) as (spec, ctx):
            z1 = getattr(self.net, spec.head_attr).inner(spec.pre_head(self.net, lr))
            return self.controller.gbc_logits(z1, ctx)

    @torch.no_grad()
    def decide_image_bits(self, tiles: Tensor, max_batch: int = 16) -> Tensor:
        """The bit-widths ``[N]`` (int64, CPU) of the ``N`` tiles of one image ``[N, 3, h, w]``.

        Without ``config.image_fab`` each tile's own decision (:meth:`decide_bits`, in chunks of
        ``max_batch``). With it, per-image rate control: the GBC logits of all tiles get the
        smallest bias along the bits that puts their mean bits at most ``image_fab``
        (:func:`~.rate.rate_controlled_choice`). Call in eval mode.
        """
        chunks = range(0, tiles.shape[0], max_batch)
        target = self.config.image_fab
        if target is None:
            return torch.cat([self.decide_bits(tiles[a : a + max_batch]).cpu() for a in chunks])
        if self.training:
            raise RuntimeError("decide_image_bits with image_fab: call model.eval() first")
        logits = torch.cat([self.gate_logits(tiles[a : a + max_batch]).cpu() for a in chunks])
        bits = torch.tensor(self.config.gbc_bits)
        return bits[rate_controlled_choice(logits, bits, target)]

    def set_image_fab(self, image_fab: float | None) -> None:
        """Per-image rate control of tiled inference from now on (None: each tile decides
        alone); see ``GranularDQConfig.image_fab``. Raises ``ConfigError`` (one line) when this
        model cannot take it (a random/fixed gate, E2B on, official numerics) or it is out of
        the GBC's bit range."""
        self.config = dataclasses.replace(self.config, image_fab=image_fab)

    @contextlib.contextmanager
    def force_bits(self, bits: Tensor | Sequence[int] | int) -> Iterator[None]:
        """Within the block, every forward uses ``bits`` (an int, or ``[N]`` per sample)."""
        t = torch.as_tensor(bits, dtype=torch.long)
        bad = sorted(set(t.flatten().tolist()) - set(self.ctx.candidates))
        if bad:
            raise ValueError(
                f"force_bits: {bad} not among this model's bit-widths {self.ctx.candidates}"
            )
        prev, self.ctx.forced = self.ctx.forced, t
        try:
            yield
        finally:
            self.ctx.forced = prev

    # ---- E2B / ATC state ----------------------------------------------------------------
    @property
    def e2b(self) -> EntropyToBit | None:
        """The E2B module (None when E2B is off)."""
        return self.controller.e2b

    @property
    def entropy_thresholds(self) -> tuple[float, float] | None:
        """Current ``(H_t1, H_t2)`` (None if E2B is off or not calibrated yet)."""
        e2b = self.e2b
        if e2b is None or not e2b.ready:
            return None
        h1, h2 = e2b.thresholds.tolist()
        return (h1, h2)

    def set_entropy_table(self, table: EntropyTable | Sequence[float] | Tensor) -> None:
        """Install the training-set entropy quantile curve (thresholds and ATC use it).

        If the config gave ``entropy_thresholds`` they are kept (ATC starts from the levels at
        which the curve reaches them); otherwise the thresholds become the curve at
        ``entropy_quantiles``.
        """
        if self.e2b is None:
            return
        curve = table.curve if isinstance(table, EntropyTable) else table
        self.e2b.set_curve(curve, keep_thresholds=self.config.entropy_thresholds is not None)

    def set_atc(self, active: bool) -> None:
        """Enable ATC for the following training forwards (the recipe: first epoch only)."""
        self.controller.atc_active = bool(active) and self.config.use_atc

    @property
    def quant_config_dict(self) -> dict[str, Any]:
        """The config as a dict, with the current (calibrated) E2B thresholds filled in."""
        cfg = self.config
        thr = self.entropy_thresholds
        if thr is not None:
            cfg = dataclasses.replace(cfg, entropy_thresholds=thr)
        return cfg.to_dict()

    @quant_config_dict.setter
    def quant_config_dict(self, value: Mapping[str, Any]) -> None:
        # A generic quantize() assigns the config dict after the transform; keep it consistent.
        self.config = GranularDQConfig.from_dict(value)

    def extra_repr(self) -> str:
        return f"method=granular_dq, arch={self.arch}, compat={self.config.compat}"


def quantize_granular_dq(
    model: nn.Module, config: GranularDQConfig | Mapping[str, Any], *, inplace: bool = False
) -> GranularDQModel:
    """Quantize a float EDSR / RDN / SRResNet with Granular-DQ (module swap, docs/methods.md §2.3).

    Quantized (:class:`~.gdq_layers.GDQConv2d`): EDSR residual blocks' two convs; RDN residual
    dense blocks' dense-layer convs and local fusion 1x1; SRResNet residual blocks' two convs.
    Float: head, the conv after the body (EDSR/SRResNet), RDN's GFF, upsampler, tail. The head's
    output feeds the bit controller (GBC input ``Z1``).

    The activation steps are initialised lazily by the first training forward (run
    :func:`calibrate_granular_dq` on one batch); weight steps now, from the float weights.

    Args:
        model: a float model from :func:`lowbitsr.create_model` (weights loaded).
        config: a :class:`GranularDQConfig` or its dict form.
        inplace: swap inside ``model``'s own modules instead of a deep copy. Either way the
            result is a new :class:`GranularDQModel` object wrapping them: use the return value.

    Returns:
        The :class:`GranularDQModel` (same device, dtype and train/eval mode as ``model``).
    """
    if isinstance(model, GranularDQModel):
        raise ValueError("quantize_granular_dq: the model is already quantized with Granular-DQ")
    if not isinstance(config, GranularDQConfig):
        if isinstance(config, Mapping):
            config = GranularDQConfig.from_dict(config)
        else:
            raise TypeError(
                f"quantize_granular_dq: config must be a GranularDQConfig or a dict, got "
                f"{type(config).__name__}"
            )
    arch, spec = _arch_spec(model)
    net = model if inplace else copy.deepcopy(model)
    official = config.compat == "official"
    ctx = BitContext(config.candidates)
    for parent, name, conv in spec.targets(net):
        setattr(parent, name, GDQConv2d.from_float(conv, ctx, config.weight_bits, official))
    e2b = None
    if config.e2b_active:
        e2b = EntropyToBit(
            config.entropy_quantiles,
            config.entropy_thresholds,
            config.resolved_atc_gamma,
            official,
        )
    channels = int(net.n_feats)
    controller = GranularBitController(
        channels,
        config.candidates,
        config.gbc_bits,
        config.e2b_bits,
        gate=config.gate,
        tau=config.tau,
        fixed_bits=config.fixed_bits,
        random_probs=config.random_probs,
        e2b=e2b,
        official=official,
        tile_stats=config.gbc_tile_stats,
    )
    ref = next(net.parameters())
    controller.to(device=ref.device, dtype=ref.dtype)
    setattr(net, spec.head_attr, _HeadTap(getattr(net, spec.head_attr), ctx, controller))
    wrapper = GranularDQModel(net, controller, ctx, config, arch)
    return wrapper.train(model.training)


def _batchnorms(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def calibrate_granular_dq(model: GranularDQModel, lr: Tensor) -> None:
    """LSQ lazy initialisation of every activation quantizer from one batch (docs/methods.md §2.3).

    Runs one training-mode forward without gradient, with the bits forced to the largest
    candidate (initialisation covers every candidate's step from the full input, whatever the
    gate would pick), BatchNorm statistics frozen and ATC off. Quantizers already initialised
    (e.g. loaded from a checkpoint) are left alone. The model's mode is restored.

    Args:
        model: from :func:`quantize_granular_dq`.
        lr: ``[N, 3, h, w]`` training LR patches in ``[0, rgb_range]``, on the model's device.
    """
    was_training = model.training
    atc = model.controller.atc_active
    bns = [(m, m.training) for m in _batchnorms(model)]
    try:
        model.train()
        model.controller.atc_active = False
        for m, _ in bns:
            m.eval()
        with model.force_bits(max(model.ctx.candidates)):
            model(lr)
    finally:
        model.train(was_training)
        model.controller.atc_active = atc
        for m, mode in bns:
            m.train(mode)
