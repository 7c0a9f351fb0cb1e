"""Which optional ops to quantize: build each op set, measure latency and fidelity, keep the most accurate of the
fastest (a strategy of :mod:`edgeq.search.trials`).

Rules:
- Optional ops are the target's requant ops (Add, Mul, Concat, Sigmoid, …) and three pseudo-ops: ``ActMatMul``
  (MatMuls of two activations: attention), on targets with ``dynamic_matmuls``, ``DynamicMatMul`` (the
  MatMul/Gemm layers with constant weights in dynamic int8), and on targets with ``pool_as_reduce``,
  ``MaxPoolAsReduce`` (int8 MaxPools over non-overlapping windows as Reshape + ReduceMax,
  :mod:`edgeq.passes.pool_as_reduce`; present where a MaxPool's windows tile its input). What pays depends
  on the model and the kernels (quantized residual Adds pay in CNNs and cost in transformers; quantized
  attention makes ORT run Softmax as a slow QLinearSoftmax; dynamic int8 computes each activation's range at
  run time; ReduceMax beats ORT's int8 MaxPool 3× on a speech model's 1×4 pools and loses 5× on a keyword
  model's small 2×2 ones).
- ``auto`` builds all present, none, all but each in turn, and all + ``DynamicMatMul`` (which ``all`` never
  implies: the first candidate, delivered when nothing is measured, is static int8). ``DynamicMatMul`` counts
  as present where its layers hold at least half of the model's layer weights (the pipeline's
  ``DYNAMIC_SHARE``: transformers and MLPs, not a CNN with a classifier).
- The candidates are one batch (they do not depend on each other). Each is measured in its own interleaved pair
  with float (interleaving many models at once thrashes
  the caches, which flatters the smallest weights) and on ``FIDELITY_FEEDS`` held-out feeds; the most accurate
  (worst-output SQNR) among those within ``SPEED_TOLERANCE`` of the fastest is chosen. (The no-slowdown check
  measures the chosen one again: a fresh figure, free of the bias of picking the best of several.)
- After the fidelity guard returned groups to float and the no-slowdown rounds left int8 no faster than float,
  the ``AFTER_GUARD`` op sets that measured fastest before the guard (the one in use aside) are measured again
  with those groups float, each checked against the guard on every held-out feed (``holds``); the fastest that
  holds it is chosen — the guard already holds accuracy, and what is sought is a build under the speed bar:
  what pays beside an int8 layer changes when its neighbour turns float (a speech-quality model's int8 MaxPools
  ran as ORT's slow loop once the Conv between them was float: its held build measured ×1.03 with the op set
  chosen for uniform int8, ×0.87 with another). None holds: the first choice stands.
"""

from __future__ import annotations

from collections.abc import Callable, Generator

from edgeq.errors import UserError
from edgeq.fidelity import worst_sqnr
from edgeq.search.trials import Candidate, Trial

ACT_MATMUL = "ActMatMul"
DYNAMIC_MATMUL = "DynamicMatMul"
POOL_AS_REDUCE = "MaxPoolAsReduce"
PSEUDO_OPS = (ACT_MATMUL, DYNAMIC_MATMUL, POOL_AS_REDUCE)
SPEED_TOLERANCE = 0.05
FIDELITY_FEEDS = 16
AFTER_GUARD = 3  # op sets measured again beside the guard's float groups


def op_set_candidates(spec: str, available: tuple[str, ...], present: set[str]) -> dict[str, tuple[str, ...]]:
    """Optional op sets to build, by label, for ``--optional-ops SPEC``."""
    static = tuple(op for op in available if op != DYNAMIC_MATMUL)
    if spec == "all":
        return {"all": static}
    if spec == "none":
        return {"none": ()}
    if spec != "auto":
        chosen = tuple(op.strip() for op in spec.split(",") if op.strip())
        unknown = sorted(set(chosen) - set(available))
        if unknown:
            raise UserError(f"--optional-ops names ops the target has no integer kernel for: {', '.join(unknown)}",
                            f"choose from {', '.join(available)}, or use auto, all or none")
        return {",".join(chosen): chosen}
    used = tuple(op for op in static if op in present)
    candidates = {"all": used, "none": ()} if used else {"none": ()}
    if len(used) > 1:
        candidates |= {f"all but {op}": tuple(o for o in used if o != op) for op in used}
    if DYNAMIC_MATMUL in available and DYNAMIC_MATMUL in present:
        candidates[f"{'all + ' if used else ''}{DYNAMIC_MATMUL}"] = (*used, DYNAMIC_MATMUL)
    return candidates


def most_accurate_of_the_fastest(figures: dict[str, dict]) -> str:
    """The label with the best ``sqnr_db`` among those whose ``ratio`` is within SPEED_TOLERANCE of the fastest."""
    fastest = min(v["ratio"] for v in figures.values())
    close = [k for k, v in figures.items() if v["ratio"] <= fastest * (1 + SPEED_TOLERANCE)]
    return max(close, key=lambda k: figures[k]["sqnr_db"])


def choose_op_set(builds: dict[str, Callable[[], object]],
                  holds: Callable[[Trial], bool] | None = None) -> Generator[list[Candidate], list[Trial], str | None]:
    """Measure every op set's build (one batch: on several boards, in parallel); returns the chosen label (with
    ``holds``: the fastest of the builds that hold the guard, measured on every held-out feed; None where none
    does)."""
    feeds = FIDELITY_FEEDS if holds is None else None
    batch = yield [Candidate("op set", label, make, time=True, feeds=feeds) for label, make in builds.items()]
    trials = {label: trial for label, trial in zip(builds, batch) if holds is None or holds(trial)}
    if not trials:
        return None
    if holds is None:
        chosen = most_accurate_of_the_fastest({k: {"ratio": t.ratio, "sqnr_db": worst_sqnr(t.fidelity)}
                                               for k, t in trials.items()})
    else:
        chosen = min(trials, key=lambda k: trials[k].ratio)
    trials[chosen].chosen = True
    return chosen
