"""The search of main_search.py (docs/search.md): the original protocol as Optuna studies whose trials are the
real stages. protocol.py: the phases and the choice; bisection.py: the sampler; phase.py: storage, studies and
one worker's loop; trials.py: one trial = one stage run; report.py: the test evaluation, table and picture."""
