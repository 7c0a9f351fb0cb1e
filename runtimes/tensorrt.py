"""TensorRT, reached through ONNX Runtime's TensorRT execution provider or its own ``trtexec``.

TensorRT runs only where an NVIDIA GPU is; for a target whose execution providers include TensorRT, the
artifact says how to run it: the target's provider options (e.g. ``trt_fp16_enable``) plus
``trt_int8_enable`` for a QDQ model and ``trt_sparsity_enable`` when 2:4 weights are present (TensorRT uses
sparse kernels only when asked), and the equivalent ``trtexec`` build command.
"""

from __future__ import annotations

from edgeq.target import Target

PROVIDER = "TensorrtExecutionProvider"


def uses_tensorrt(target: Target) -> bool:
    return PROVIDER in target.onnxruntime.providers


def provider_options(target: Target, int8: bool, sparse: bool) -> dict:
    options = dict(target.onnxruntime.provider_options.get(PROVIDER, {}))
    if int8:
        options["trt_int8_enable"] = True
    if sparse:
        options["trt_sparsity_enable"] = True
    return options


def deployment(target: Target, model_file: str, int8: bool, sparse: bool) -> dict:
    """How to run the artifact's model with TensorRT: ORT session settings and a trtexec command."""
    options = provider_options(target, int8, sparse)
    flags = (["--fp16"] if options.get("trt_fp16_enable") else []) + (["--int8"] if int8 else []) + (
        ["--sparsity=enable"] if sparse else [])
    return {
        "onnxruntime": {"providers": list(target.onnxruntime.providers),
                        "provider_options": {PROVIDER: options}},
        "trtexec": " ".join(["trtexec", f"--onnx={model_file}", *flags, "--saveEngine=model.engine"]),
    }
