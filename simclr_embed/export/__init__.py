"""``simclr export-onnx``: a trained checkpoint as a self-contained ONNX model (uint8 pixels in).

Modules: ``onnx_export`` (wrapper, export, metadata), ``verify`` (parity checks), ``quantize``
(int8), ``triton`` (model repository), ``cli`` (the command).
"""
