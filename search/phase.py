"""Optuna storage and studies of a search, and one worker's loop over the trials of a phase; how workers
share a study and how a dead worker's trial is taken over: docs/search.md ("Many workers, many machines").

A budget counted in trial-number order (claim()) keeps a phase to its number of trials, and a worker leaves a
phase only once no trial of it is running: the next phase starts from its result. A dead trial is failed
without an `error`, so its point is proposed again and the new trial resumes its folder.
"""
import logging
import os
import socket
import time
import warnings

import optuna
from optuna.storages import fail_stale_trials  # the RUNNING trials without a heartbeat for GRACE_SECONDS
from optuna.trial import TrialState

from search.bisection import BisectionSampler, label, next_point, outcomes
from utils.errors import UserError
from utils.faults import scoped

# A live worker misses six heartbeats in a row before its trial is taken for dead; a killed one's point runs
# again about two minutes after it died.
HEARTBEAT_SECONDS, GRACE_SECONDS = 20, 120
POLL_SECONDS = 2.0  # a worker waiting for other workers' trials looks this often
CLAIM_POLL_SECONDS = 0.05  # a claim waiting for earlier trials to take their points (a few storage calls)


def open_storage(url):
    """Optuna's RDB storage (SQLite file, PostgreSQL, MySQL ...) with heartbeats; SQLite waits for its lock
    instead of failing when several processes write at once."""
    kwargs = {"connect_args": {"timeout": 120}} if url.startswith("sqlite") else {}
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # the heartbeat's
    for attempt in range(3):  # workers starting together race to create the tables: the loser reopens
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=kwargs, heartbeat_interval=HEARTBEAT_SECONDS,
                                              grace_period=GRACE_SECONDS)
        except Exception as e:  # sqlalchemy's errors: bad URL, missing driver, unreachable server
            error = e
            time.sleep(POLL_SECONDS * (attempt + 1))
    raise UserError(f"--storage {url}: cannot open it ({str(error).splitlines()[0][:160]})") from None


def open_study(storage, name, knob, settings):
    """Create or reopen a study, whose `settings` (what makes its trials comparable) must be those it began with."""
    study = optuna.create_study(storage=storage, study_name=name, sampler=BisectionSampler(knob),
                                directions=["maximize", "minimize"], load_if_exists=True)
    old = study.user_attrs.get("settings")
    if old is None:
        study.set_user_attr("settings", settings)
    elif old != settings:
        key = next(k for k in sorted(set(old) | set(settings)) if old.get(k) != settings.get(k))
        raise UserError(f"study {name} in the storage was started with {key} = {old.get(key)!r}, not "
                        f"{settings.get(key)!r}: give another --study_name or --result_dir to start afresh")
    return study


def trial_dir(root, study, number, knob, x):
    """A trial's own folder: named by its study and trial number, unique in the storage."""
    return os.path.join(root, study.study_name, f"{number}-{knob.name}{label(x)}")


def claim(study, knob, budget, number):
    """The point of trial `number` (RUNNING, created by ask(), which the storage hands out atomically) and the
    folder of a dead trial at that point to resume (or None): (x, folder), or None when the phase has no trial
    left for it. The point is chosen from the trials numbered below it only, once each holds its point or ended."""
    while True:
        earlier = [t for t in study.get_trials(deepcopy=False) if t.number < number]
        # an earlier trial without a point is choosing one: ours must see it, or both could take one point
        if not any(t.state == TrialState.RUNNING and knob.name not in t.params for t in earlier):
            break
        time.sleep(CLAIM_POLL_SECONDS)
        fail_stale_trials(study)  # one that died choosing would be waited for until failed
    done, flying, _ = outcomes(earlier, knob)
    x = next_point(knob, done, flying)
    # the trials that fill the phase's budget: running or ran (not skipped, not killed)
    counted = [t for t in earlier if t.state in (TrialState.RUNNING, TrialState.COMPLETE)
               or (t.state == TrialState.FAIL and "error" in t.user_attrs)]
    if x is None or len(counted) >= budget:
        return None
    dead = [t for t in earlier if t.state == TrialState.FAIL and "error" not in t.user_attrs
            and knob.name in t.params and label(t.params[knob.name]) == label(x) and "dir" in t.user_attrs]
    return x, max(dead, key=lambda t: t.number).user_attrs["dir"] if dead else None


class Worker:
    """Runs trials in this process, each in a folder under `root`; counts them for the fault hook
    (DYNPRUNE_KILL_AT="trial:N:...")."""

    def __init__(self, root, log=print):
        self.root, self.count, self.log = root, 0, log
        # Optuna logs a trial that raised with its traceback; one failed by its stage's one-line error (UserError)
        # has the search's own line already, which says why: Optuna's record of it is dropped
        self.reported = set()
        self.quiet = lambda record: not any(record.getMessage().startswith(f"Trial {n} failed ") for n in self.reported)

    def run_phase(self, study, knob, budget, run_trial, describe):
        """Run this worker's share of the phase (`run_trial(x, folder)` -> its results, val_acc and val_gflops
        among them; `describe` its line) until every trial of it has finished, here or in another worker."""
        waiting = False
        while True:
            fail_stale_trials(study)
            done, flying, running = outcomes(study.get_trials(deepcopy=False), knob)
            if len(done) + running < budget and next_point(knob, done, flying) is not None:
                optuna_log = logging.getLogger("optuna.study._optimize")
                optuna_log.addFilter(self.quiet)
                try:
                    study.optimize(lambda trial: self._objective(trial, study, knob, budget, run_trial, describe),
                                   n_trials=1, catch=(UserError,))
                finally:
                    optuna_log.removeFilter(self.quiet)
            elif running:
                if not waiting:
                    self.log(f"[search] {study.study_name}: waiting for {running} trial(s) of other workers (one "
                             f"whose worker is gone runs again once its heartbeat is {GRACE_SECONDS} s old)")
                    waiting = True
                time.sleep(POLL_SECONDS)
            else:
                return

    def _objective(self, trial, study, knob, budget, run_trial, describe):
        # where it runs, for the user (trials.json); liveness is the heartbeat's, never these
        trial.set_user_attr("host", socket.gethostname())
        trial.set_user_attr("pid", os.getpid())
        claimed = claim(study, knob, budget, trial.number)
        if claimed is None:  # lost the race for the phase's last point: the loop finds other work or waits
            trial.set_user_attr("skipped", "another worker took the phase's last trial")
            raise optuna.TrialPruned()
        x, resumed = claimed
        folder = resumed or trial_dir(self.root, study, trial.number, knob, x)
        trial.set_user_attr("dir", folder)  # before running: a trial resuming it after a crash finds it
        study.sampler.claimed[trial.number] = x
        x = trial.suggest_float(knob.name, knob.low, knob.high)
        self.count += 1
        t0 = time.time()
        try:
            with scoped("trial", self.count):
                result = run_trial(x, folder)
        except UserError as e:
            trial.set_user_attr("error", str(e))
            self.log(describe(x, {"error": str(e)}, time.time() - t0))
            self.reported.add(trial.number)  # that line says it all: no traceback from Optuna beside it
            raise
        for key, value in result.items():
            trial.set_user_attr(key, value)
        trial.set_user_attr("seconds", time.time() - t0)
        self.log(describe(x, result, time.time() - t0))
        return result["val_acc"], result["val_gflops"]


def run_alone(storage, name, work):
    """work()'s result in this worker, or None when another live worker is doing it. The claim is a trial of
    study `name` held while work() runs, alive by its heartbeat; of workers claiming together, the lowest
    trial number goes on."""
    study = optuna.create_study(storage=storage, study_name=name, load_if_exists=True)
    result, raised = [], []

    def objective(trial):
        fail_stale_trials(study)
        if any(t.state == TrialState.RUNNING and t.number < trial.number for t in study.get_trials(deepcopy=False)):
            raise optuna.TrialPruned()
        try:
            result.append(work())
        except BaseException as e:  # raised below, as itself: Optuna would log it with a traceback first
            raised.append(e)
        return 0.0

    study.optimize(objective, n_trials=1)
    if raised:
        raise raised[0]
    return result[0] if result else None


def trial_records(study, phase):
    """Every trial of a study as a plain dict (trials.json)."""
    return [{"phase": phase, "study": study.study_name, "number": t.number, "state": t.state.name,
             "point": t.params, **t.user_attrs} for t in study.get_trials(deepcopy=False)]
