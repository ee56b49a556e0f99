"""Bisection on one monotone knob, as an Optuna sampler (why not TPE or a GP: docs/search.md, "Why
bisection"). Trials in flight split the interval too; search/phase.py's claim() makes that view complete.

Noise: a feasible point beyond an infeasible one moves the bracket past it (the best feasible point wins);
infeasible points below the best feasible one are ignored.
"""
from dataclasses import dataclass

import optuna
from optuna.trial import TrialState


@dataclass(frozen=True)
class Knob:
    """One monotone knob of a phase: values in [low, high]; `aggressive` is the end that saves more
    ("high": compression, alpha; "low": a GFLOPs target); gaps under 2 x `resolution` (the precision with
    which the stage meets the knob's target) are not worth a trial."""
    name: str
    low: float
    high: float
    aggressive: str
    resolution: float

    def score(self, x):
        """Larger = more aggressive."""
        return x if self.aggressive == "high" else -x

    def ends(self):
        """(conservative end, aggressive end)."""
        return (self.low, self.high) if self.aggressive == "high" else (self.high, self.low)


def label(x):
    """A knob value as it appears in folder names and logs."""
    return f"{x:.6g}"


def outcomes(trials, knob):
    """([(x, feasible)] of the finished trials, [x] in flight, number running). A trial failed with an error of
    its stage (user attr `error`) counts as infeasible; one whose process died does not (its point runs again)."""
    done, flying, running = [], [], 0
    for t in trials:
        x = t.params.get(knob.name)
        if t.state == TrialState.RUNNING:
            running += 1
            if x is not None:
                flying.append(x)
        elif x is not None and t.state == TrialState.COMPLETE:
            done.append((x, bool(t.user_attrs["feasible"])))
        elif x is not None and t.state == TrialState.FAIL and "error" in t.user_attrs:
            done.append((x, False))
    return done, flying, running


def bracket(knob, done):
    """(most aggressive feasible point, or the conservative end; nearest infeasible point beyond it, or the
    aggressive end)."""
    conservative, aggressive = knob.ends()
    best = max((x for x, ok in done if ok), key=knob.score, default=conservative)
    beyond = [x for x, ok in done if not ok and knob.score(x) > knob.score(best)]
    return best, min(beyond, key=knob.score, default=aggressive)


def next_point(knob, done, flying):
    """The middle of the widest gap between the bracket's ends and the points in flight; None when no gap
    is worth a trial (the threshold is located to the knob's resolution, or the rest is in flight)."""
    if knob.low == knob.high:  # one fixed value: a single trial
        return None if done or flying else knob.low
    if no_trial_reason(knob):
        return None
    lo, hi = sorted(bracket(knob, done))
    cuts = sorted({lo, hi, *(x for x in flying if lo < x < hi)})
    width, a, b = max((b - a, a, b) for a, b in zip(cuts, cuts[1:]))
    return None if width / 2 < knob.resolution else (a + b) / 2


def no_trial_reason(knob):
    """Why no point of the knob's interval is worth a trial (next_point's test before any trial), or None."""
    span = f"[{knob.low:.4g}, {knob.high:.4g}]"
    if knob.low > knob.high:
        return f"its {knob.name} interval {span} is empty (its low end is above its high end)"
    if knob.low < knob.high and (knob.high - knob.low) / 2 < knob.resolution:
        return (f"its {knob.name} interval {span} is too narrow: under twice the {knob.resolution:.4g} within "
                f"which the stage meets a {knob.name}, so no point of it is worth a trial")
    return None


class BisectionSampler(optuna.samplers.BaseSampler):
    """Proposes the point search.phase.claim() chose for the trial, else next_point from the trials below it."""

    def __init__(self, knob):
        self.knob, self.claimed = knob, {}  # trial number -> its claimed point, set just before suggest

    def infer_relative_search_space(self, study, trial):
        return {}

    def sample_relative(self, study, trial, search_space):
        return {}

    def sample_independent(self, study, trial, param_name, param_distribution):
        if trial.number in self.claimed:
            return self.claimed.pop(trial.number)
        done, flying, _ = outcomes([t for t in study.get_trials(deepcopy=False) if t.number < trial.number],
                                   self.knob)
        x = next_point(self.knob, done, flying)
        if x is None:  # nothing worth a trial left: the bracket's middle
            x = sum(bracket(self.knob, done)) / 2
        return x
