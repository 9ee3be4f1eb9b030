"""The emitters behind :func:`lowbitsr.deploy.onnx_export.export_onnx`, one module per
concern: :mod:`.graph` (builder), :mod:`.layers`, :mod:`.quantizers`, :mod:`.gdq`
(Granular-DQ) and :mod:`.archs` (whole architectures). The format is documented in
:mod:`lowbitsr.deploy.onnx_export`.
"""
