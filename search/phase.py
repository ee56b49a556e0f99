"""Optuna storage and studies of a search, and one worker's loop over the trials of a phase.

Every worker (one process, on this machine or another) runs the same loop on the same studies: the
storage hands out trial numbers, the bisection sampler keeps workers off each other's points, a budget
counted in trial-number order keeps the phase to its number of trials, and a worker leaves a phase only
once no trial of it is running, because the next phase starts from its result.

Interrupted trials: a trial left RUNNING by a process that died is failed (without an `error`) as soon as
a worker on the same host sees the process gone, or by Optuna's heartbeat after GRACE_SECONDS when it ran
on another machine; the bisection then proposes its point again and the new trial resumes its folder.
"""
import os
import socket
import time
import warnings

import optuna
from optuna.trial import TrialState

from search.bisection import BisectionSampler, next_point, outcomes
from utils.errors import UserError
from utils.faults import scoped

HEARTBEAT_SECONDS, GRACE_SECONDS = 60, 600
POLL_SECONDS = 2.0  # a worker waiting for other workers' trials looks this often


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
    """Create or reopen a study; `settings` (what makes its trials comparable) must equal those it was
    started with."""
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


def alive(pid):
    """Whether process `pid` of this host runs."""
    if not isinstance(pid, int) or pid <= 0:
        return True  # unknown: never fail a trial on a guess
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fail_dead_trials(study):
    """Fail the RUNNING trials whose process, on this host, is gone (killed, crashed); then Optuna's
    heartbeat check for those of other hosts."""
    host = socket.gethostname()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if t.user_attrs.get("host") == host and t.user_attrs.get("pid") != os.getpid() \
                and not alive(t.user_attrs.get("pid", -1)):
            try:
                study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
            except optuna.exceptions.UpdateFinishedTrialError:
                pass  # another worker got there first
    optuna.storages.fail_stale_trials(study)


def _over_budget(study, number, budget):
    """Trials numbered below this one that run or ran (not skipped, not killed) fill the budget."""
    counted = [t for t in study.get_trials(deepcopy=False) if t.number < number and (
        t.state in (TrialState.RUNNING, TrialState.COMPLETE)
        or (t.state == TrialState.FAIL and "error" in t.user_attrs))]
    return len(counted) >= budget


class Worker:
    """Runs trials in this process; counts them for the fault hook (DYNPRUNE_KILL_AT="trial:N:...")."""

    def __init__(self, log=print):
        self.count, self.log = 0, log

    def run_phase(self, study, knob, budget, run_trial, describe):
        """Run this worker's share of the phase: `run_trial(x)` -> dict with val_acc, val_gflops, feasible
        (and any other result, kept as user attrs); `describe(x, result, seconds)` is the trial's line.
        Returns once every trial of the phase has finished, in this worker or any other."""
        while True:
            fail_dead_trials(study)
            done, flying, running = outcomes(study, knob)
            if len(done) + running < budget and next_point(knob, done, flying) is not None:
                study.optimize(lambda trial: self._objective(trial, study, knob, budget, run_trial, describe),
                               n_trials=1, catch=(UserError,))
            elif running:
                time.sleep(POLL_SECONDS)
            else:
                return

    def _objective(self, trial, study, knob, budget, run_trial, describe):
        trial.set_user_attr("host", socket.gethostname())
        trial.set_user_attr("pid", os.getpid())
        done, flying, _ = outcomes(study, knob, exclude=trial.number)
        if _over_budget(study, trial.number, budget) or next_point(knob, done, flying) is None:
            trial.set_user_attr("skipped", "another worker took the phase's last trial")
            raise optuna.TrialPruned()
        x = trial.suggest_float(knob.name, knob.low, knob.high)
        self.count += 1
        t0 = time.time()
        try:
            with scoped("trial", self.count):
                result = run_trial(x)
        except UserError as e:
            trial.set_user_attr("error", str(e))
            self.log(describe(x, {"error": str(e)}, time.time() - t0))
            raise
        for key, value in result.items():
            trial.set_user_attr(key, value)
        trial.set_user_attr("seconds", time.time() - t0)
        self.log(describe(x, result, time.time() - t0))
        return result["val_acc"], result["val_gflops"]


def trial_records(study, phase):
    """Every trial of a study as a plain dict (trials.json)."""
    return [{"phase": phase, "study": study.study_name, "number": t.number, "state": t.state.name,
             "point": t.params, **t.user_attrs} for t in study.get_trials(deepcopy=False)]
