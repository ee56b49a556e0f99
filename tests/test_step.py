"""The training step's host cost: the ops it dispatches and the host syncs of the loop, and the exactness of
what makes them few (the masked mix, the straight-through, the switches' convolution form), the compiled step
(--compile), device-side augmentation and masked per-epoch evaluation."""
import collections
import json
import types

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import main_rl_prune
import main_sp
import stages.sp
from bench.bench_step import setup as bench_setup
from bench.bench_step import top_level_ops
import conftest
from conftest import mix_switches
from gates.optim import make_optimizer
from gates.policy import Baseline, ReinforceStep, discounted_returns, discounts, policy_loss, skip_rewards
from gates.price import shares
from models.switches import act, log_prob
from helpers import tiny_dataset
from models import build_model, make_arch
from models.resnet import _Mix, compile_step
from utils.data import BatchLoader
from utils.dist import Context
from runtime.evaluate import evaluate
from runtime.steps import supervised_step
from runtime.loop import train_epoch
from utils.flops import measure_costs
from utils.synthetic import make_synthetic

CPU = Context(device=torch.device("cpu"))
SGD = types.SimpleNamespace(lr=0.05, momentum=0.9, weight_decay=5e-4, switch_lr=None, switch_weight_decay=None)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    yield from conftest.one_thread()


# ------------------------------------------------------------------------------ exactness

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_masked_mix_is_the_block_or_its_shortcut_bit_for_bit_with_the_formulas_gradients(dtype):
    g = torch.Generator().manual_seed(0)
    r, s, grad = (torch.randn(6, 4, 3, 3, generator=g).to(dtype) for _ in range(3))
    a = torch.tensor([1., 0., 1., 1., 0., 0.])
    y = F.relu(r + s)
    assert torch.equal(_Mix.apply(r, s, a), torch.where(a.view(-1, 1, 1, 1) > 0, y, s))
    if dtype != torch.float64:
        return
    mine = [t.clone().requires_grad_() for t in (r, s, a)]
    _Mix.apply(*mine).backward(grad)
    ref = [t.clone().requires_grad_() for t in (r, s, a)]
    a4 = ref[2].view(-1, 1, 1, 1).to(dtype)
    (F.relu(ref[0] + ref[1]) * a4 + ref[1] * (1 - a4)).backward(grad)  # the expression it replaces
    for got, want in zip(mine, ref):
        torch.testing.assert_close(got.grad, want.grad, rtol=0, atol=1e-12)


def test_straight_through_forwards_p_over_half_and_backwards_as_p():
    p = torch.tensor([0.0, 0.3, 0.5, 0.5000001, 0.7, 1.0], requires_grad=True)
    a = act(p, "hard", training=True)
    assert torch.equal(a, (p > 0.5).float())
    a.backward(torch.arange(6.0))
    assert torch.equal(p.grad, torch.arange(6.0))
    greedy = act(p, "greedy", training=True)
    assert torch.equal(greedy, a) and not greedy.requires_grad
    assert not act(p, "sample", training=True).requires_grad


def test_rnn_switches_compute_what_lstmcell_and_linear_compute():
    """The (N, C, 1, 1) convolution form against nn.LSTMCell and nn.Linear on the same parameters: the same
    probabilities, states and parameter gradients up to float rounding."""
    torch.manual_seed(0)
    switches = build_model(make_arch(depth=14, width=1, num_classes=10)).switches
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(5, proj.in_channels, 4, 4, generator=g) for proj in switches.proj]
    weights = torch.randn(len(xs), 5, generator=g)

    def run(reference):
        switches.zero_grad(set_to_none=True)
        state, loss = None, 0
        for j, x in enumerate(xs):
            if reference:
                e = switches.proj[j](x.mean((2, 3), keepdim=True)).flatten(1)
                state = torch.nn.LSTMCell.forward(switches.lstm, e, state)
                p = torch.sigmoid(torch.nn.Linear.forward(switches.head, state[0])).squeeze(1)
                h, c = state
            else:
                p, state = switches(j, x, state)
                h, c = state[0].flatten(1), state[1].flatten(1)
            loss = loss + (p * weights[j]).sum() + 0.1 * h.sum() + 0.1 * c.sum()
        loss.backward()
        return loss.detach(), p.detach(), h.detach(), c.detach(), \
            {n: q.grad.clone() for n, q in switches.named_parameters()}

    mine, ref = run(False), run(True)
    for got, want in zip(mine[:4], ref[:4]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for name in ref[4]:
        torch.testing.assert_close(mine[4][name], ref[4][name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("gamma", [1.0, 0.5, 0.0])
def test_reinforce_step_is_the_reference_arithmetic(gamma):
    """ReinforceStep's loss, gradients and statistics against skip_rewards, discounted_returns, log_prob and
    policy_loss (tested by hand in test_rl.py) wired by hand, over two steps (the moving baseline carries
    state)."""
    n, s = 6, 4
    costs = {"base": 1000.0, "switches": 50.0, "blocks": [100.0, 200.0, 300.0, 400.0]}
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(n, 5, generator=g)
    probs = torch.rand(n, s, generator=g) * 0.9 + 0.05
    actions = (torch.rand(n, s, generator=g) < 0.5).float()
    y = torch.randint(0, 5, (n,), generator=g)
    step = ReinforceStep(costs, 0.3, gamma, 0.1, Baseline("moving", s, momentum=0.5))
    baseline = Baseline("moving", s, momentum=0.5)
    for _ in range(2):
        mine = [logits.clone().requires_grad_(), probs.clone().requires_grad_()]
        loss, stats = step(lambda x, mode: (mine[0] * 1, actions, mine[1] * 1), torch.zeros(n, 1), y)
        loss.backward()
        ref = [logits.clone().requires_grad_(), probs.clone().requires_grad_()]
        ce = F.cross_entropy(ref[0], y, reduction="none")
        rewards = skip_rewards(actions, shares(costs["blocks"]), 0.3)
        returns = discounted_returns(rewards, discounts(gamma, s), -ce.detach())
        p_loss = policy_loss(log_prob(ref[1], actions), returns, baseline(returns))
        ref_loss = ce.mean() + 0.1 * p_loss
        ref_loss.backward()
        torch.testing.assert_close(loss.detach(), ref_loss.detach(), rtol=1e-6, atol=1e-6)
        for got, want in zip(mine, ref):
            torch.testing.assert_close(got.grad, want.grad, rtol=1e-5, atol=1e-6)
        blocks = torch.tensor(costs["blocks"], dtype=torch.float64)
        always = costs["base"] + costs["switches"]
        # "loss" the cross-entropy (the backbone's loss, the curve a user watches), the policy loss beside it
        want = {"loss": ce.mean(), "policy_loss": p_loss, "reward": rewards.sum(1).mean() - ce.mean(),
                "acc": 100 * (logits.argmax(1) == y).double().mean(),
                "exec_rate": actions.mean(0), "sampled_gflops": (always + actions.double() @ blocks).mean() / 1e9,
                "greedy_gflops": (always + (probs > 0.5).double() @ blocks).mean() / 1e9}
        assert "alpha" not in stats  # a fixed alpha: a constant curve
        for key, value in want.items():
            torch.testing.assert_close(stats[key].double(), value.detach().double(), rtol=1e-6, atol=1e-5,
                                       msg=lambda m, key=key: f"{key}: {m}")


# ------------------------------------------------------------------------------ op counts

def test_switch_steps_dispatch_about_three_times_the_dense_steps_ops():
    """ATen ops per training step (bench/bench_step.py's count) at ResNet-32: the stage-1 hard step and the
    stage-3 step dispatched ~3.9x the dense loop's ops (1,539 and 1,507 against 389) and now ~3.0x; most of
    what remains is the LSTM cell's pointwise ops, ~20 a switch, which only a fused kernel or --compile
    removes. A regression guard."""
    counts = {}
    for name in ("dense", "hard", "rl"):
        args = types.SimpleNamespace(depth=32, width=1, bs=4, device="cpu", backend=None)
        counts[name] = sum(top_level_ops(bench_setup(name, args, compiled=False)).values())
    assert counts["dense"] < 420, counts
    assert counts["hard"] <= 3.2 * counts["dense"] and counts["rl"] <= 3.2 * counts["dense"], counts


# ------------------------------------------------------------------------------ --compile

def _losses(kind, backend, steps=20):
    torch.manual_seed(0)
    model = build_model(make_arch(depth=8, width=1, num_classes=10)).train()
    costs = measure_costs(model, 16)
    optimizer = make_optimizer(model, SGD)
    step = {"joint": stages.sp.joint_step,
            "rl": ReinforceStep(costs, 0.5, 1.0, 0.1, Baseline("moving", model.num_switches))}[kind]
    if backend:
        step = compile_step(step, "cpu", backend=backend)
    g = torch.Generator().manual_seed(1)
    torch.manual_seed(5)  # the sampling in `sample` mode
    losses = []
    for _ in range(steps):
        x, y = torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 10, (8,), generator=g)
        loss, _ = step(model, x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    return torch.stack(losses)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["joint", "rl"])
def test_compiled_step_trains_as_the_eager_one(kind):
    """20 SGD steps of stage 1's joint step (dense + hard routes) and of stage 3's step, eager and compiled:
    the same losses. aot_eager runs the traced graph with the eager kernels, so stage 3's Bernoulli draws are
    the same too (inductor, the CUDA default, draws its own random numbers: same distribution, other draws)."""
    eager, compiled = _losses(kind, None), _losses(kind, "aot_eager")
    torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-5)


def test_compile_report_counts_graphs_recompiles_and_cuda_graphs():
    """What a compiled step did: the graphs compiled, each recompilation (a new batch shape here) with its
    reason, and CUDA graphs: never under aot_eager; on CUDA's reduce-overhead, used unless inductor skipped
    them (a stubbed skip counter here)."""
    from torch._dynamo.utils import clear_compilation_metrics, counters
    from models.resnet import compile_report
    torch._dynamo.reset()  # what earlier tests of this process compiled is not this step's
    counters.clear()
    clear_compilation_metrics()
    torch.manual_seed(0)
    model = build_model(make_arch(depth=8, width=1, num_classes=10)).train()
    step = compile_step(supervised_step, "cpu", backend="aot_eager")
    assert compile_report(supervised_step) is None  # an eager step
    for bs in (4, 4, 6):
        loss, _ = step(model, torch.randn(bs, 3, 16, 16), torch.randint(0, 10, (bs,)))
        loss.backward()
    report = compile_report(step)
    assert report["backend"] == "aot_eager" and report["graphs"] >= 2 and report["recompiles"] >= 1, report
    assert any("size mismatch" in r for r in report["recompile_reasons"]) and report["cuda_graphs"] is False
    step.mode = "reduce-overhead"
    assert compile_report(step)["cuda_graphs"] is True
    counters["inductor"]["cudagraph_skips"] += 1
    assert compile_report(step)["cuda_graphs"] is False and compile_report(step)["cudagraph_skips"] == 1
    torch._dynamo.reset()


def test_compile_flag_and_its_defaults():
    assert main_sp.parse_args(["--compile"]).compile and not main_sp.parse_args([]).compile
    assert main_rl_prune.parse_args(["--compile"]).compile
    step = compile_step(supervised_step, "cuda")  # nothing compiled before the first call
    assert (step.backend, step.mode) == ("inductor", "reduce-overhead")
    step = compile_step(supervised_step, "cpu")
    assert (step.backend, step.mode) == ("aot_eager", None)


@pytest.mark.slow
def test_stage1_runs_compiled(tmp_path):
    data = tiny_dataset(tmp_path / "data", classes=4, train_per_class=16, test_per_class=8, size=16)
    main_sp.main(["--depth", "8", "--width", "1", "--bs", "16", "--num_workers", "0", "--device", "cpu",
                  "--resize", "16", "--epochs", "1", "--lr", "0.05", "--compile", "--data_dir", data,
                  "--result_dir", str(tmp_path / "results")])
    metrics = json.load(open(tmp_path / "results" / "sp" / "metrics.json"))
    assert metrics["test_images"] == 32 and metrics["train_mode"] == "joint"


# ------------------------------------------------------------------------------ host syncs

class HostReads(TorchDispatchMode):
    """Counts what makes the host wait for a CUDA device, as seen on the CPU: the ops whose result the host
    must read (_local_scalar_dense: .item(), bool(), int(), float(); nonzero and the other data-dependent
    shapes), and Tensor.tolist / .numpy / .cpu, which on the CPU read memory without dispatching an op
    (patched). On the CPU these cost nothing, so a CPU run counts the syncs a GPU run would make. Not
    seen: host-to-device copies from pageable memory (torch.tensor(list, device=...), .to(cuda)), which
    also block; the loader makes one per epoch (the permutation), the loop none."""

    OPS = {"_local_scalar_dense", "nonzero", "masked_select", "_unique2", "unique_dim", "unique_consecutive",
           "repeat_interleave"}

    def __init__(self, monkeypatch):
        super().__init__()
        self.reads = collections.Counter()
        for name in ("tolist", "numpy", "cpu"):
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._counting(name, original))

    def _counting(self, name, original):
        def read(tensor, *args, **kwargs):
            self.reads[name] += 1
            return original(tensor, *args, **kwargs)
        return read

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in self.OPS:
            self.reads[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self):
        return sum(self.reads.values())


def _data(n_train, size=8):
    tx, ty, vx, vy, _ = make_synthetic(num_classes=4, train_per_class=n_train // 4, test_per_class=12, size=size)
    common = dict(device="cpu", mean=[0.5] * 3, std=[0.25] * 3)
    return (BatchLoader(torch.from_numpy(tx), torch.from_numpy(ty), 4, train=True, seed=3, **common),
            BatchLoader(torch.from_numpy(vx), torch.from_numpy(vy), 16, train=False, **common))


@pytest.mark.parametrize("kind", ["hard", "rl"])
def test_training_reads_the_device_only_at_the_logging_interval(monkeypatch, kind):
    """train_epoch over 52 steps (augmented batches): 2 reads at each of its checks (steps 1, 26, 51 and the
    last: the non-finite check and the bar's loss) and one per statistic at the end: O(steps / 25)."""
    train, _ = _data(208)
    torch.manual_seed(0)
    model = build_model(make_arch(depth=8, width=1, num_classes=4))
    step = supervised_step if kind == "hard" else \
        ReinforceStep(measure_costs(model, 8), 0.1, 1.0, 0.1, Baseline("moving", model.num_switches))
    optimizer = make_optimizer(model, SGD)
    train_epoch(model, train, optimizer, None, step, CPU, 0)  # warm-up: the first step's one-off reads
    train.set_epoch(1)
    with HostReads(monkeypatch) as reads:
        stats = train_epoch(model, train, optimizer, None, step, CPU, 1)
    steps, checks = len(train), len(range(0, len(train), 25)) + 1
    assert steps == 52
    assert reads.total <= 2 * checks + len(stats), reads.reads
    assert reads.reads["nonzero"] == 0


def test_masked_evaluation_reads_once_and_equals_skip_evaluation(monkeypatch):
    """Per-epoch evaluation with masked execution: one read in all (the sums), against one per gated block
    and batch with skipping; the same decisions, accuracy, GFLOPs and (to rounding) loss."""
    _, test = _data(16, size=32)
    model = mix_switches(build_model(make_arch(depth=14, width=1, num_classes=4)), seed=2)
    costs = measure_costs(model, 32)
    results = {}
    for execution in ("mask", "skip"):
        with HostReads(monkeypatch) as reads:
            results[execution] = evaluate(model, test, CPU, costs, execution=execution)
        results[execution]["reads"] = reads.total
        assert model.execution == "auto"  # restored
    mask, skip = results["mask"], results["skip"]
    assert mask["reads"] == 1 and skip["reads"] >= len(test) * model.num_switches, (mask, skip)
    assert 0 < sum(mask["exec_rate"]) < model.num_switches  # mixed routes
    for key in ("acc", "gflops", "exec_rate", "images"):
        assert mask[key] == skip[key], key
    assert mask["loss"] == pytest.approx(skip["loss"], rel=1e-5)


def test_skip_evaluation_runs_without_cudnn_benchmark(monkeypatch):
    """Skipping gives each gated block a new sub-batch size per batch: cudnn.benchmark (on with CUDA) is off
    while an evaluation skips, on while it masks (static shapes), and restored after either."""
    _, test = _data(16, size=32)
    model = mix_switches(build_model(make_arch(depth=8, width=1, num_classes=4)), seed=2)
    costs = measure_costs(model, 32)
    seen = []
    model.register_forward_pre_hook(lambda m, inputs: seen.append(torch.backends.cudnn.benchmark))
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    for execution in ("skip", "mask", None):  # None: the model's own (skipping at inference)
        seen.clear()
        evaluate(model, test, CPU, costs, execution=execution)
        assert seen and set(seen) == {execution == "mask"}, execution
        assert torch.backends.cudnn.benchmark


def test_augmentation_draws_on_the_images_device_without_copies(monkeypatch):
    """The crop and flip draws come from a generator on the images' device: no Tensor.to per batch (a CPU
    generator's draws were copied to the GPU at every batch); only the epoch's permutation is copied."""
    train, _ = _data(64)
    calls = collections.Counter()
    original = torch.Tensor.to

    def to(tensor, *args, **kwargs):
        calls["to"] += 1
        return original(tensor, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", to)
    seen = []
    real = torch.randint

    def randint(*args, generator=None, device=None, **kwargs):
        seen.append(generator.device if generator is not None else None)
        return real(*args, generator=generator, device=device, **kwargs)

    monkeypatch.setattr(torch, "randint", randint)
    train.set_epoch(0)
    batches = list(train)
    assert len(batches) == 16 and calls["to"] <= 1
    assert seen and all(d == train.x.device for d in seen)
