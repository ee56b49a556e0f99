"""The stage runtime: what runs a stage's training around its own algorithm.

    loop.py        the epoch loop (train_epoch), the device / DDP / autocast set-up, SGD, schedules, per-epoch seeds
    steps.py       the step functions the stages share (supervised, dense)
    evaluate.py    evaluation (accuracy, loss, GFLOPs of each route) and BN statistics re-estimated
    checkpoint.py  the checkpoint format: the one dict every stage writes, loading and checking it
    stage.py       StageRun (a stage's folder, checkpoint per epoch, metrics.json), resume and input checks
    table.py       the table's three rows from the stages' results (python -m runtime.table)
"""
