"""Quantization numerics shared by the passes: the layer-wise error-compensation solver (:mod:`.obs`)."""
