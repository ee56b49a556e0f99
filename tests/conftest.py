"""Shared by the tests: the import path, one thread policy, and the trained networks several modules use.

Fast loop: `python -m pytest -m "not slow"` runs every module's unit behaviour (under 90 s on 2 idle cores);
the tests marked `slow` (end-to-end stage runs, subprocess pipelines, torchrun, the study / crossfit quick
runs, the GPU check's dry run) run with the full suite, `python -m pytest`.
pytest.ini runs both on every core (pytest-xdist, `-n auto`, whole files per worker); `-n 0` runs them in this
one process (a debugger, `-x` on the first failure in order).

Session fixtures (each built once per worker, read by many modules; a test that writes into one copies it
first with shutil.copytree into its tmp_path):
- `trained_stage1`: a tiny dataset and one stage-1 run on it;
- `pipeline`: that stage-1 result followed by stage 2 and stage 3 in a result dir of its own.
"""
import os
import shutil
import sys

# Before torch is imported: OpenMP threads that spin while waiting starve each other on a loaded 2-core
# machine (40-200x slower small ops); passive waiting costs nothing measurable when the machine is quiet.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
torch.set_num_threads(2)


# The files that take longest, started first: the workers then end together (longest first is the classic
# schedule for one queue and several workers; alphabetical order left one worker alone on the last files).
LONGEST_FIRST = ("test_pipeline.py", "test_crossfit.py", "test_export.py", "test_study.py", "test_sp.py",
                 "test_resume.py", "test_gpu_check.py", "test_search.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(os.path.basename(str(item.path)), len(rank)))  # stable: file order kept


def pytest_xdist_auto_num_workers(config):
    """`-n auto` (pytest.ini): one worker per core, at most 4 (each holds its own copy of the session
    fixtures); test files are dealt whole to the workers (--dist loadfile), so a module's fixtures are
    built once."""
    return max(1, min(4, os.cpu_count() or 1))


def mix_switches(model, seed=0):
    """Make the switches take mixed decisions within a batch: BNs get random statistics, and each switch's
    probability is re-centred on its batch median (a forward hook on the real switch output, monotone, so
    the images with the higher p execute). Works for both switch kinds."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
        for p in model.switches.parameters():
            p.copy_(torch.randn(p.shape, generator=g))

    def recentre(module, inputs, output):
        p, state = output
        z = torch.logit(p.double().clamp(1e-12, 1 - 1e-12))
        # threshold half-way between the two middle values, not at one of them: no image sits on the
        # boundary, where float noise of sub-batch execution could flip its decision
        middle = z.sort().values[(len(z) - 1) // 2:(len(z) - 1) // 2 + 2].mean()
        return torch.sigmoid(8 * (z - middle) / (z.std(correction=0) + 1e-12)).to(p.dtype), state

    model.switches.register_forward_hook(recentre)
    return model


@pytest.fixture
def root():
    return ROOT


def one_thread():
    """Torch on one thread while the fixture that yields from it lives (a module's or a test's). Tiny nets
    gain nothing from a second thread and lose much when the cores are shared (a thread descheduled at each
    of thousands of small parallel regions); one thread also computes exactly as one-thread subprocesses."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# the tiny dataset of `trained_stage1`, and stage 1's flags common to the modules that run it
STAGE1_DATA = dict(classes=4, train_per_class=24, test_per_class=6, size=16)
STAGE1_FLAGS = ["--depth", "8", "--width", "1", "--lr", "0.05", "--resize", "16", "--num_workers", "0",
                "--device", "cpu"]


def write_and_train(tmp, data, argv, results="results"):
    """Write the tiny dataset `data` (helpers.tiny_dataset's keywords) at tmp/data and run stage 1 in-process
    with `argv` into tmp/<results>: (tmp, data_dir, result_dir)."""
    import main_sp
    from helpers import tiny_dataset
    data_dir = tiny_dataset(tmp / "data", **data)
    res = tmp / results
    main_sp.main([*argv, "--data_dir", data_dir, "--result_dir", str(res)])
    return tmp, data_dir, res


@pytest.fixture(scope="session")
def trained_stage1(tmp_path_factory):
    """One stage-1 network for the session: ResNet-8 at width 1 on 4 classes of 16x16 images (24 training, 6
    test per class), SkipNet's recipe (2 dense epochs, then 2 of the supervised phase with hard switches:
    one epoch of the latter from a random start leaves the network at chance) with a validation split of
    0.25 (the search chooses on it). (root, data_dir, result_dir), the checkpoint in
    result_dir/sp/checkpoint.pt. Read only: copy it (shutil.copytree) before writing beside it."""
    root = tmp_path_factory.mktemp("stage1")
    return write_and_train(root, STAGE1_DATA, [*STAGE1_FLAGS, "--epochs", "4", "--dense_epochs", "2", "--bs", "16",
                                               "--val_split", "0.25"], results="base")


PIPELINE_COMMON = ["--bs", "16", "--num_workers", "0", "--device", "cpu"]
PIPELINE_RL = ["--lr", "0.01", "--alpha", "0.5", *PIPELINE_COMMON]  # the resize comes from the checkpoint


def prune_config(path, results, data, **over):
    """A small stage-2 config file at `path` (results, data and any key overridden by `over`)."""
    import json
    cfg = {"result_dir": str(results), "data_dir": str(data), "num_workers": 0,
           "device": "cpu", "compression": 0.4, "epochs": 1, "lr": 0.01, "bs": 16, "fisher_batches": 2, **over}
    with open(path, "w") as f:
        json.dump(cfg, f)
    return str(path)


@pytest.fixture(scope="session")
def pipeline(tmp_path_factory, trained_stage1):
    """A finished three-stage run (checkpoints of every stage) to be hostile against, to kill and resume
    from: `trained_stage1`'s stage 1 copied, then stage 2 and stage 3 of one epoch each. (tmp, data_dir,
    result_dir); tmp is a folder of its own to build inputs in. Read only, like `trained_stage1`."""
    import main_prune
    import main_rl_prune
    _, data, base = trained_stage1
    tmp = tmp_path_factory.mktemp("pipeline")
    res = tmp / "results"
    shutil.copytree(base / "sp", res / "sp")
    main_prune.main(["--config_path", prune_config(tmp / "config.json", res, data)])
    main_rl_prune.main([*PIPELINE_RL, "--data_dir", data, "--result_dir", str(res), "--epochs", "1"])
    return tmp, data, res
