"""The search mechanism: strategies propose candidates, the driver measures each once, every trial is kept."""

import math

from edgeq.search import Candidate, Trial, longest_prefix, run


class CountingTrials:
    """Stands in for :class:`edgeq.search.Trials`: 'measuring' a candidate just builds it and keeps the trial."""

    def __init__(self):
        self.log = []

    def measure(self, candidate):
        trial = Trial(candidate, candidate.make())
        self.log.append(trial)
        return trial


def test_bisection_finds_the_longest_passing_prefix_in_log2_trials():
    for size in (1, 2, 7, 12, 33):
        for longest in range(size):  # the whole list fails by assumption
            trials = CountingTrials()
            strategy = longest_prefix(list(range(size)),
                                      lambda prefix: Candidate("test", f"{len(prefix)}", lambda n=len(prefix): n),
                                      lambda trial: trial.build <= longest)
            kept, best = run(strategy, trials)
            assert kept == longest
            assert len(trials.log) <= math.ceil(math.log2(size + 1))
            assert [t.build for t in trials.log if t.chosen] == ([longest] if longest else [])
            assert best is None if longest == 0 else best.build == longest


def test_a_trial_records_its_strategy_label_facts_and_choice():
    trial = Trial(Candidate("op set", "all but Add", lambda: None, facts={"quantized_nodes": 4}), None, chosen=True)
    assert trial.to_dict() == {"strategy": "op set", "label": "all but Add", "quantized_nodes": 4, "chosen": True}
    assert trial.ratio is None


def test_float_runs_on_each_held_out_feed_once_however_far_trials_ask(tmp_path):
    import numpy as np
    import onnx

    from conftest import conv_model
    from edgeq.calibration_data import CalibrationData, InputSpec
    from edgeq.recipe import Recipe
    from edgeq.runtimes.onnxruntime import OnnxRuntime
    from edgeq.search import Trials
    from edgeq.target import load_target

    paths = {}
    for name, seed in (("float", 0), ("candidate", 1)):
        paths[name] = tmp_path / f"{name}.onnx"
        onnx.save(conv_model(seed=seed), paths[name])
    runtime, runs = OnnxRuntime(load_target("x86-64")), {"float": 0, "candidate": 0}
    opened = runtime.session

    def counting(path, *args, **kwargs):
        session, name = opened(path, *args, **kwargs), "float" if path == paths["float"] else "candidate"

        class Counted:
            output_names = session.output_names

            def run(self, feed):
                runs[name] += 1
                return session.run(feed)
        return Counted()

    runtime.session = counting
    holdout = CalibrationData.random([InputSpec("x", np.dtype(np.float32), (1, 3, 16, 16))], 6, seed=1)
    trials = Trials(runtime, paths["float"], next(iter(holdout)).inputs, holdout, Recipe(), timed=False)
    first = trials.fidelity(paths["candidate"], 2)
    for feeds in (4, None, 3):
        trials.fidelity(paths["candidate"], feeds)
    assert runs == {"float": 6, "candidate": 2 + 4 + 6 + 3}
    assert first == trials.fidelity(paths["candidate"], 2)


def test_op_sets_measured_again_after_the_guard_choose_among_those_that_hold_it():
    from edgeq.runtimes.base import Latency
    from edgeq.search.op_sets import choose_op_set

    figures = {"all": (0.80, 34.0), "none": (0.95, 41.0), "all but Add": (0.86, 36.0)}  # ratio, SQNR dB

    class FakeTrials(CountingTrials):
        def measure_batch(self, candidates):
            batch = []
            for candidate in candidates:
                ratio, sqnr = figures[candidate.label]
                trial = self.measure(candidate)
                trial.latency = {"float": Latency(1.0, 1.0, 1.0, 1), "int8": Latency(ratio, ratio, ratio, 1)}
                trial.fidelity = {"outputs": {"y": {"sqnr_db": sqnr}}}
                batch.append(trial)
            return batch

    builds = {label: (lambda: None) for label in figures}
    trials = FakeTrials()
    assert run(choose_op_set(builds), trials) == "all"  # the most accurate within 5% of the fastest
    assert all(t.candidate.feeds == 16 for t in trials.log)
    trials = FakeTrials()
    held = run(choose_op_set(builds, lambda trial: trial.fidelity["outputs"]["y"]["sqnr_db"] >= 35), trials)
    assert held == "all but Add" and [t.candidate.label for t in trials.log if t.chosen] == ["all but Add"]
    assert all(t.candidate.feeds is None for t in trials.log)  # every held-out feed, as the guard is checked
    assert run(choose_op_set(builds, lambda trial: False), FakeTrials()) is None
