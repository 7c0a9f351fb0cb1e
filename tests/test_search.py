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
