"""edgeq: an ONNX edge deployment compiler — calibrated int8 QDQ for a named target, measured on it."""

__version__ = "0.1.0"
