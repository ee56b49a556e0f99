import os
import sys

# Before torch is imported: OpenMP threads that spin while waiting starve each other on a loaded 2-core
# machine (40-200x slower small ops); passive waiting costs nothing measurable when the machine is quiet.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
torch.set_num_threads(2)


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
