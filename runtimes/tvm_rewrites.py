"""Relax rewrites edgeq applies between TVM's ONNX import and legalization (:func:`before_legalize`), and to
the weight packing of tuned kernels at build time (:func:`fold_weight_packing`).

Rules:
- Constants: ops on constants that import and layout conversion leave behind (weight transposes, bias reshapes,
  shape arithmetic, the NaN guards of Clip bounds) are folded with numpy. TVM's ``FoldConstant`` compiles each
  folded op with LLVM (~0.1 s apiece: 11 s of every MobileNetV2 compile); numpy takes microseconds. An op on
  constants not listed in :data:`NUMPY_FOLDS` is computed at run time, as the importer left it.
- CPU convolutions run channels-last (NHWC, weights OHWI): vectors then span output channels, each input value
  is broadcast once per kernel tap, and MetaSchedule finds fast schedules in far fewer trials than for NCHW
  (ResNet-18-like, 150 trials: 1.55× ONNX Runtime's latency against 2.5× in NCHW, both with packed weights).
  Layout conversion runs only where there is a convolution to convert.
- Clamps: the importer turns ONNX Clip into calls of TOPI ``maximum``/``minimum`` kernels, which layout
  conversion cannot see through (each ReLU6 between two NHWC convolutions would cost two transposes); with
  scalar constant bounds they become the Relax ops ``maximum``/``minimum``, which it converts.
- Squeeze axes are made positive before layout conversion, which runs out of memory on a negative one (BERT-
  and ViT-like imports have them).
- Weight packing: a tuned kernel may read its weights in a layout of its own; the packing is computed once, at
  build time, into new constants.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

CPU_LAYOUTS = {"relax.nn.conv2d": ["NHWC", "OHWI"]}


def _floating(compute):
    """``compute`` for floating-point operands only (Relax divides integers as C does, numpy does not)."""
    return lambda call, a: compute(*a) if all(np.issubdtype(x.dtype, np.floating) for x in a) else None


def _static_shape(ty) -> np.ndarray | None:
    """A shape known at compile time, as the int64 tensor ``shape_to_tensor`` makes of it."""
    values = getattr(ty, "values", None)
    if values is None or not all(isinstance(v, tvm.ir.prim.expr.IntImm) for v in values):
        return None
    return np.array([int(v) for v in values], np.int64)


# op → (how many leading arguments must be constants, numpy computation of the result or None to leave it)
NUMPY_FOLDS = {
    "relax.permute_dims": (1, lambda call, a: np.transpose(a[0], None if call.attrs.axes is None
                                                            else [int(x) for x in call.attrs.axes])),
    "relax.reshape": (1, lambda call, a: a[0].reshape([int(d) for d in call.args[1].values])),
    "relax.isnan": (1, lambda call, a: np.isnan(a[0])),
    "relax.where": (3, lambda call, a: np.where(a[0], a[1], a[2])),
    "relax.less": (2, lambda call, a: np.less(*a)),
    "relax.add": (2, lambda call, a: np.add(*a)),
    "relax.subtract": (2, lambda call, a: np.subtract(*a)),
    "relax.multiply": (2, lambda call, a: np.multiply(*a)),
    "relax.divide": (2, _floating(np.divide)),
    "relax.take": (2, lambda call, a: np.take(a[0], a[1], axis=int(call.attrs.axis),
                                              mode="wrap" if call.attrs.mode == "wrap" else "clip")),
    "relax.shape_to_tensor": (0, lambda call, a: _static_shape(call.args[0].ty)),
}


def before_legalize(mod, cpu: bool) -> list:
    """The rewrites for ``mod``, as passes: constants folded; on a CPU, clamps as Relax ops and, where the model
    has convolutions, channels-last layouts."""
    fold = _module_pass(fold_constants)
    if not cpu:
        return [fold]
    layout = [_module_pass(squeeze_axes_positive), relax.transform.ConvertLayout(CPU_LAYOUTS), fold] \
        if has_op(mod, "relax.nn.conv2d") else []
    return [fold, _module_pass(clamps_as_relax_ops), *layout]


def fold_constants(mod):
    """Calls of :data:`NUMPY_FOLDS` ops on constants replaced by their values, until none is left."""
    folded = 0

    def fold(call):
        nonlocal folded
        count, compute = NUMPY_FOLDS.get(getattr(call.op, "name", ""), (None, None))
        tensors = call.args[:count] if compute else ()
        if compute is None or not all(isinstance(t, tvm.ir.expr.GenericConst) for t in tensors):
            return None
        value = compute(call, [t.value.numpy() for t in tensors])
        if value is None:
            return None
        folded += 1
        return relax.const(np.array(value, order="C"), str(value.dtype))  # (ascontiguousarray makes 0-d 1-d)

    while True:  # a folded value reaches its users through a binding: canonicalizing inlines it, folding goes on
        before = folded
        mod = relax.transform.CanonicalizeBindings()(rewrite_calls(mod, fold))
        if folded == before:
            return mod


def clamps_as_relax_ops(mod):
    """TOPI ``maximum``/``minimum`` calls with a scalar constant bound → Relax ``maximum``/``minimum``."""
    ops = {"maximum": relax.op.maximum, "minimum": relax.op.minimum}
    call_tir = tvm.ir.Op.get("relax.call_tir")

    def clamp(call):
        if call.op != call_tir or not isinstance(call.args[1], relax.Tuple) or len(call.args[1].fields) != 2:
            return None
        op = ops.get(call.args[0].name_hint.rstrip("0123456789"))
        x, bound = call.args[1].fields
        if op is None or not isinstance(bound, tvm.ir.expr.GenericConst) or bound.value.ndim != 0:
            return None
        return op(x, bound)

    return rewrite_calls(mod, clamp)


def squeeze_axes_positive(mod):
    """``squeeze`` axes counted from the front."""

    def positive(call):
        if getattr(call.op, "name", "") != "relax.squeeze" or call.attrs.axis is None:
            return None
        axes = [int(a) for a in call.attrs.axis]
        if min(axes) >= 0:
            return None
        ndim = call.args[0].ty.ndim
        return relax.op.squeeze(call.args[0], [a % ndim for a in axes])

    return rewrite_calls(mod, positive)


def fold_weight_packing(mod):
    """The weight packing that tuned schedules chose (split out of their kernels by ``SplitLayoutRewritePreproc``:
    kernel calls on constants) computed here, once, into new constants. TVM's ``FoldConstant`` builds each of
    those kernels alone (6 s of a MobileNetV2 re-compile); here they are built together in one module, for this
    machine (the constants are computed here whatever the target)."""
    call_tir = tvm.ir.Op.get("relax.call_tir")

    def on_constants(expr) -> bool:
        return (isinstance(expr, relax.Call) and expr.op == call_tir and isinstance(expr.args[1], relax.Tuple)
                and all(isinstance(a, tvm.ir.expr.GenericConst) for a in expr.args[1].fields))

    kernels = {}
    for _, func in mod.functions_items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, lambda e: kernels.setdefault(
                e.args[0].name_hint, mod[e.args[0]]) if on_constants(e) else None)
    if not kernels:
        return mod
    library = tvm.compile(tvm.IRModule({name: f.with_attr("global_symbol", name) for name, f in kernels.items()}),
                          target=tvm.target.Target({"kind": "llvm"}))

    def pack(call):
        if not on_constants(call):
            return None
        types = call.ty.fields if isinstance(call.ty, relax.TupleType) else [call.ty]  # weight and bias packed
        outs = [tvm.runtime.empty([int(d) for d in t.shape.values], t.dtype, tvm.cpu()) for t in types]
        library[call.args[0].name_hint](*[a.value for a in call.args[1].fields], *outs)
        values = [relax.const(o.numpy(), t.dtype) for o, t in zip(outs, types)]
        return relax.Tuple(values) if isinstance(call.ty, relax.TupleType) else values[0]

    return relax.transform.CanonicalizeBindings()(rewrite_calls(mod, pack))


def has_op(mod, name: str) -> bool:
    """Whether a Relax function of ``mod`` calls the operator ``name``."""
    found = []
    for _, func in mod.functions_items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, lambda e: found.append(
                isinstance(e, relax.Call) and getattr(e.op, "name", "") == name))
    return any(found)


def rewrite_calls(mod, rewrite):
    """Every Relax function of ``mod`` with each call replaced by ``rewrite(call)`` (``None``: kept), bottom-up;
    what no longer has a user is dropped."""

    @relax.expr_functor.mutator
    class Rewriter(relax.PyExprMutator):
        def visit_call_(self, call):
            call = self.visit_expr_post_order(call)
            rewritten = rewrite(call)
            return call if rewritten is None else rewritten

    rewriter = Rewriter(mod)
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            rewriter.builder_.update_func(gv, rewriter.visit_expr(func))
    return relax.transform.DeadCodeElimination()(rewriter.builder_.get())


def _module_pass(rewrite):
    return tvm.transform.module_pass(lambda mod, _: rewrite(mod), opt_level=0, name=rewrite.__name__)
