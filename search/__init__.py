"""The search of main_search.py: the original protocol (the cheapest static, then static + dynamic network
within an accuracy budget, chosen on a validation split) as Optuna studies whose trials are the real stages.

    protocol.py   the phases, the choice within the budget and the report (Search)
    bisection.py  the knobs and the bisection sampler
    phase.py      storage, studies, one worker's loop over a phase's trials
    trials.py     one trial = one run of stage 2 or stage 3 (stages.prune.run, stages.rl.run) in its own
                  result folder
    report.py     the final test evaluation, table.md/.json, trials.json and the Pareto picture
"""
