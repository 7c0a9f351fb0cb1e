"""Graph passes, one concept per module, each an ``onnx_ir`` pass.

normalize → exclude → calibrate → insert_qdq; see each module's docstring for the rules it follows.
"""
