"""The default fidelity guard: what "the same model" means when the user states no ``--metric`` or ``--max-drop``.

Rules:
- Every output is held to the threshold of its kind (:mod:`edgeq.fidelity` reads the kind from the float
  model's outputs), on the held-out feeds:

  ======================  ===================================================  ==========================
  kind                    figure                                               threshold
  ======================  ===================================================  ==========================
  indices                 share of equal elements (token ids, class indices)   ≥ 0.99
  classes                 argmax agreement per position (softmax outputs)      ≥ 0.99
                          and, with positions, sequence agreement              ≥ 0.99
                          (CTC frames — softmax, log-probabilities or logits,
                          time-major too: symbols kept, decoded sequences equal)
  logits                  argmax agreement, and SQNR (> 16 values per sample,  ≥ 0.99, ≥ 20 dB
                          or an output named logits; per position for
                          [batch, positions, C] logits so named)
  scores                  IoU of the values above 0.5 (probability maps; one   ≥ 0.90
                          with none above 0.5 in float is a map)
  segments                IoU of the pixels not decided background (per-pixel  ≥ 0.90
                          class maps; one with only background is a map; a
                          frame classifier's frames, their events ≥ 8 long)
  embedding               cosine                                               ≥ 0.99
  values                  SQNR (≤ 16 values per sample: scores, regressions)   ≥ 35 dB
  map                     SQNR (spectrograms, box and distribution maps)       ≥ 18 dB
  curve                   SQNR of each row's shape, its mean removed ([batch,   ≥ 18 dB
                          C] rows whose neighbouring values differ by at most
                          half their spread: a forecast, a profile; its level
                          comes with the input, its argmax is its peak's
                          position, no class)
  change                  SQNR of the change float makes to the input the      ≥ 18 dB
                          output has the shape of (an autoencoder's
                          reconstruction, a denoiser's or an enhancer's
                          output: what the model does is the change), or of
                          the output where it has less power than the change
  detections              F1 of the items matched one to one (outputs whose    ≥ 0.98
                          length or order depends on values: boxes after NMS
                          or a top-K by IoU ≥ 0.5 and class, peaks; a count
                          by its number; a raw YOLO head's decoded boxes; a
                          match scoring ≤ 0.05 under the floor is kept),
                          and a -seg/-pose head's SQNR as a map too           ≥ 18 dB
  ======================  ===================================================  ==========================

  The thresholds sit between what real models kept and lost at their task (edgeq's real-model corpus): a
  speech-embedding CNN kept its word accuracy at cosine 0.9956 (20.5 dB); a layout detector lost most boxes at
  7.8 dB on its box distributions; quality-score regressors with a 0.05 tolerance on means of 2–3 missed it
  at 26 dB and at 31.9 dB (three scores, mean error 0.056) and kept it at 32.9 dB (0.047): 35 dB is 1.8% of
  the signal; a machine-sound anomaly autoencoder judged by its reconstruction's argmax lost int8 (×0.55) at
  agreement 0.92 while its anomaly scores moved 0.1% (its change held 40 dB); a 96-step forecaster judged as
  logits lost int8 (×0.33, its error unchanged) at 0.966 agreement of its peaks' positions; a text detector
  lost its probability map at IoU 0.83; an embedding model lost
  nearest-neighbour agreement at cosine 0.93; a classifier at top-1 agreement 0.95; a table-structure
  decoder lost 10 of 100 tables at token agreement 0.998 on 6 held-out tables, whose sequence agreement
  (:mod:`edgeq.fidelity`: expected from the margins) was 0.76, and 4 of 100 (a 1-table tolerance) at 0.957.
- An output with NaN/Inf where float has none fails whatever its kind.
- ``--metric`` or ``--max-drop`` replace the guard; ``--no-guard`` turns it off.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass, field

from edgeq.search import Candidate, Trial, longest_prefix

MAP_SQNR_DB = 18.0  # a map's, a curve's, a change's, and a raw detector head's with more than detections in it
WHERE_PRESENT = {"sequence_agreement", "map_sqnr_db"}  # figures only some outputs of a kind carry: checked there
THRESHOLDS: dict[str, tuple[tuple[str, float], ...]] = {
    "indices": (("decision_agreement", 0.99),),
    "classes": (("decision_agreement", 0.99), ("sequence_agreement", 0.99)),
    "logits": (("decision_agreement", 0.99), ("sqnr_db", 20.0)),
    "scores": (("decision_agreement", 0.90),),
    "segments": (("decision_agreement", 0.90),),
    "embedding": (("cosine", 0.99),),
    "values": (("sqnr_db", 35.0),),
    "map": (("sqnr_db", MAP_SQNR_DB),),
    "change": (("change_sqnr_db", MAP_SQNR_DB),),
    "curve": (("shape_sqnr_db", MAP_SQNR_DB),),
    "detections": (("decision_agreement", 0.98), ("map_sqnr_db", MAP_SQNR_DB)),
}


def check(fidelity: dict) -> dict:
    """Each output's figures against its kind's thresholds; ``met`` when every output holds."""
    outputs = {}
    for name, output in fidelity["outputs"].items():
        kind = output.get("kind", "map")
        checks = [{"figure": figure, "value": float(output.get(figure, float("-inf"))), "min": minimum}
                  for figure, minimum in THRESHOLDS[kind] if figure in output or figure not in WHERE_PRESENT]
        for item in checks:
            item["met"] = item["value"] >= item["min"] and not output.get("nonfinite")
        outputs[name] = {"kind": kind, "checks": checks, "met": all(c["met"] for c in checks)}
    return {"met": all(o["met"] for o in outputs.values()), "outputs": outputs}


def no_worse(result: dict, than: dict) -> bool:
    """Every figure of ``result`` at least as good as the same figure of ``than`` (two checks of one model)."""
    return all(mine["value"] >= theirs["value"]
               for name, output in result["outputs"].items()
               for mine, theirs in zip(output["checks"], than["outputs"][name]["checks"]))


_SHORT = {"decision_agreement": "agreement", "sequence_agreement": "sequences", "sqnr_db": "SQNR dB",
          "map_sqnr_db": "map SQNR dB", "change_sqnr_db": "change SQNR dB", "shape_sqnr_db": "shape SQNR dB"}


def describe(result: dict) -> str:
    """One line per output: kind, figure vs threshold."""
    parts = []
    for name, output in result["outputs"].items():
        figures = ", ".join(f"{_SHORT.get(c['figure'], c['figure'])} {c['value']:.4g}"
                            f"{'≥' if c['met'] else '<'}{c['min']:g}" for c in output["checks"])
        parts.append(f"{name} ({output['kind']}): {figures}")
    return "; ".join(parts)


@dataclass
class GuardResult:
    """What holding the guard took: the build that holds it (None: only float does), and every check."""

    build: object | None
    float_groups: list[str] = field(default_factory=list)
    trials: list[dict] = field(default_factory=list)


def checked(trial: Trial) -> dict:
    """The guard's check of a measured trial; records ``met`` with the trial."""
    result = check(trial.fidelity)
    trial.candidate.facts["guard_met"] = result["met"]
    return result


def keep_order(groups: list, nsr: dict[str, float], savings: dict[str, float] | None) -> list:
    """Groups ordered cheapest to keep int8 first: by output NSR per millisecond its int8 kernels save where
    ``savings`` are measured, else by NSR. A group that saves less than a tenth of the median saving counts as
    saving that tenth (a profile cannot rank kernels too small to time, and a layer that int8 makes slower
    still costs its noise), so a sensitive group that saves nothing returns to float before one that pays for
    its noise with speed (the greedy order of a knapsack: most time kept per unit of noise)."""
    positive = sorted(ms for ms in (savings or {}).values() if ms > 0)
    if not positive:
        return sorted(groups, key=lambda g: nsr[g.name])
    floor = positive[len(positive) // 2] / 10
    return sorted(groups, key=lambda g: nsr[g.name] / max(savings.get(g.name, 0.0), floor))


def hold(groups: list, nsr: dict[str, float], make: Callable[[set[str]], object],
         uniform_check: dict, savings: dict[str, float] | None = None) -> Generator[Candidate, Trial, GuardResult]:
    """Return the fewest groups to float, those that cost most noise per millisecond saved, so that the guard
    holds (a strategy of :mod:`edgeq.search`).

    ``nsr``: each group's output NSR with that group alone in int8 (the sensitivity table of
    :mod:`edgeq.mixed.sensitivity`); ``savings``: the milliseconds each group's int8 kernels save over float
    (None where latency is not measured); ``make(float_nodes)`` builds a candidate with those nodes float,
    which is measured on every held-out feed. Groups are ordered by :func:`keep_order` and the longest prefix
    that may stay int8 while the guard holds is found by bisection (:func:`edgeq.search.longest_prefix`): at
    most ⌈log₂(groups + 1)⌉ builds, each checked and recorded. ``uniform_check`` is the known miss of uniform
    int8."""
    order = keep_order(groups, nsr, savings)
    checks = [{"float_groups": 0, "met": uniform_check["met"], "outputs": uniform_check["outputs"]}]

    def candidate(prefix) -> Candidate:
        float_nodes = {node for g in order[len(prefix):] for node in g.nodes}
        return Candidate("guard", f"{len(prefix)} of {len(order)} groups int8", lambda: make(float_nodes),
                         feeds=None, facts={"float_groups": len(order) - len(prefix)})

    def passes(trial: Trial) -> bool:
        result = checked(trial)
        checks.append({"float_groups": trial.candidate.facts["float_groups"]} | result)
        return result["met"]

    kept, best = yield from longest_prefix(order, candidate, passes)  # 0: no group may stay int8
    return GuardResult(best.build if best else None, [g.name for g in order[kept:]], checks)
