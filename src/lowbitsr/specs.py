"""What the command line, the report and the benchmarks all accept as text: model specs and
dataset specs.

* :func:`load_any_model`: ``bicubic``, a shipped name (``pretrained:NAME`` or ``NAME``), a
  training run's folder, a saved model (``.safetensors``/``.json`` or their stem), a packed file,
  or (``backend="onnx"``) an exported ONNX file.
* :func:`parse_dataset_spec`: ``bundled[:split]``, ``div2k:ROOT[:FIRST-LAST]``,
  ``benchmark:ROOT/NAME``, ``folder:DIR`` → a spec for :func:`lowbitsr.data.build_dataset`.

This module sits above every other library layer (it loads from all of them) and below the CLI
and the report, which import it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import LowbitsrError

__all__ = ["DATASET_HELP", "load_any_model", "parse_dataset_spec"]

DATASET_HELP = (
    "dataset: bundled[:test|valid|train], div2k:ROOT[:FIRST-LAST], benchmark:ROOT/NAME "
    "(EDSR-PyTorch layout, e.g. benchmark:/data/benchmark/Set5), folder:DIR (HR images; LR made "
    "by bicubic)"
)


def parse_dataset_spec(spec: str) -> dict[str, Any]:
    """Turn a ``kind:arg`` string into a dataset spec for :func:`lowbitsr.data.build_dataset`.

    Raises:
        LowbitsrError: an unknown kind (the message lists the accepted forms).
    """
    kind, _, rest = spec.partition(":")
    if kind == "bundled":
        return {"type": "bundled", "split": rest or "test"}
    if kind == "div2k":
        root, _, rng = rest.partition(":")
        out: dict[str, Any] = {"type": "div2k", "root": root}
        if rng:
            a, _, b = rng.partition("-")
            out["index_range"] = [int(a), int(b)]
            out["split"] = "valid" if int(a) > 800 else "train"
        return out
    if kind == "benchmark":
        p = Path(rest)
        return {"type": "benchmark", "root": str(p.parent), "name": p.name}
    if kind == "folder":
        return {"type": "folder", "root": rest}
    raise LowbitsrError(f"dataset spec {spec!r} not understood; {DATASET_HELP}")


def load_any_model(
    ref: str, scale: int | None = None, *, backend: str = "torch", threads: int | None = None
) -> tuple[Any, str]:
    """The model a spec names, and a short display name for it.

    Args:
        ref: ``bicubic``; ``pretrained:NAME`` or a shipped ``NAME``; a saved model (run folder,
            ``.safetensors``/``.json`` file or their stem); a packed file; with
            ``backend="onnx"``/``"openvino"`` an ONNX file written by ``lowbitsr export``.
        scale: the scale of the bicubic baseline (required for ``bicubic`` only).
        backend: ``"torch"`` (a module), ``"onnx"`` (an :class:`lowbitsr.deploy.OnnxSR`) or
            ``"openvino"`` (an :class:`lowbitsr.deploy.OpenVinoSR`).
        threads: runtime threads (``"onnx"``/``"openvino"`` only).
    Raises:
        LowbitsrError: nothing of that name, or bicubic without a scale.
    """
    if backend in ("onnx", "openvino"):
        if not Path(ref).is_file():
            raise LowbitsrError(f"{ref}: no such ONNX file (make one with lowbitsr export)")
        if backend == "openvino":
            from .deploy.openvino_rt import OpenVinoSR, openvino_available

            if not openvino_available():
                raise LowbitsrError(
                    "--backend openvino needs the openvino package: pip install openvino"
                )
            return OpenVinoSR(ref, threads=threads), Path(ref).stem
        from .deploy import OnnxSR

        return OnnxSR(ref, threads=threads), Path(ref).stem

    from .checkpoint import load_model
    from .evaluate import Bicubic
    from .pretrained import list_pretrained, load_pretrained

    if ref == "bicubic":
        if scale is None:
            raise LowbitsrError("the bicubic baseline needs --scale")
        return Bicubic(scale), "bicubic"
    name = ref.split(":", 1)[1] if ref.startswith("pretrained:") else ref
    if name in list_pretrained():
        return load_pretrained(name), name
    if not Path(ref).exists() and not Path(ref + ".json").exists():
        raise LowbitsrError(
            f"{ref}: no such saved model or pretrained name "
            f"(pretrained: {', '.join(list_pretrained())})"
        )
    from .deploy import is_packed_file, load_packed

    if is_packed_file(ref):
        return load_packed(ref), _display_name(ref)
    return load_model(ref), _display_name(ref)


def _display_name(ref: str) -> str:
    """A short name for a saved model: its stem, with the run folder's name for a run's own
    ``model`` / ``best`` files (``runs/x/gdq_s0/model`` -> ``gdq_s0``, ``.../best`` ->
    ``gdq_s0_best``), which would otherwise all read "model"."""
    path = Path(ref)
    stem = path.stem if path.suffix in (".json", ".safetensors") else path.name
    parent = path.resolve().parent.name
    if stem in ("model", "best") and parent:
        return parent if stem == "model" else f"{parent}_best"
    return stem
