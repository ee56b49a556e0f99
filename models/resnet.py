"""CIFAR ResNet (depth 6n+2, widths 16k/32k/64k, option-B shortcuts) with a switch before every block but
the first. Built from a plain, JSON-serialisable architecture description (see models/__init__.py), which
after static pruning also names the rank of every factored conv."""
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.switches import MODES, SWITCH_KINDS, act


class FactoredConv(nn.Module):
    """A conv after eigenbasis pruning: rot_in (1x1) into A's kept eigendirections, core k x k, rot_out (1x1)
    back to G's space; widths as the original's. A side keeping every direction has no rotation (None)."""

    def __init__(self, in_ch, out_ch, kernel_size, stride, padding, rank_in, rank_out):
        super().__init__()
        self.channels = (in_ch, out_ch)
        self.rot_in = nn.Conv2d(in_ch, rank_in, 1, bias=False) if rank_in < in_ch else None
        self.core = nn.Conv2d(rank_in, rank_out, kernel_size, stride=stride, padding=padding, bias=False)
        self.rot_out = nn.Conv2d(rank_out, out_ch, 1, bias=False) if rank_out < out_ch else None

    def forward(self, x):
        for conv in (self.rot_in, self.core, self.rot_out):
            if conv is not None:
                x = conv(x)
        return x


def make_conv(name, ranks, in_ch, out_ch, kernel_size, stride=1):
    padding = kernel_size // 2
    if name in ranks:
        return FactoredConv(in_ch, out_ch, kernel_size, stride, padding, *ranks[name])
    return nn.Conv2d(in_ch, out_ch, kernel_size, stride=stride, padding=padding, bias=False)


class BasicBlock(nn.Module):
    def __init__(self, name, ranks, in_ch, out_ch, stride):
        super().__init__()
        self.conv1 = make_conv(f"{name}.conv1", ranks, in_ch, out_ch, 3, stride)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = make_conv(f"{name}.conv2", ranks, out_ch, out_ch, 3)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.projects = stride != 1 or in_ch != out_ch
        if self.projects:  # option B: 1x1 conv (+BN) wherever the shape changes
            self.shortcut = make_conv(f"{name}.shortcut", ranks, in_ch, out_ch, 1, stride)
            self.shortcut_bn = nn.BatchNorm2d(out_ch)

    def residual(self, x):
        return self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))

    def skip(self, x):
        """What the block outputs when its switch says skip: its shortcut."""
        return self.shortcut_bn(self.shortcut(x)) if self.projects else x

    def forward(self, x):
        return F.relu(self.residual(x) + self.skip(x))

    def forward_masked(self, x, a):
        """Every image computes the block; the 0/1 mask `a` (N,) mixes block output and shortcut."""
        return _Mix.apply(self.residual(x), self.skip(x), a)

    def forward_skipping(self, x, a):
        """Inference: the block runs only on the images that execute it, saving wall-clock time."""
        s = self.skip(x)
        idx = a.nonzero().flatten()
        if not torch.compiler.is_exporting():  # eager shortcuts; export keeps one data-independent graph
            n = idx.numel()
            if n == x.shape[0]:
                return F.relu(self.residual(x) + s)
            if n == 0:
                return s
        # x[idx], not x.index_select(0, idx): on CPU index_select copies a large row in one parallel region
        # per image, which costs far more when the cores are shared (bench/bench_dynamic.py measures it)
        y = F.relu(self.residual(x[idx]) + s[idx])
        # in place on a clone: out-of-place index_copy returns NCHW whatever s's layout, and every later block
        # would then run its convolutions outside channels_last
        return s.clone().index_copy_(0, idx, y.to(s.dtype))

    def forward_branching(self, x, a):
        """One image: the block runs or not as control flow (torch.cond; ONNX `If`). torch.cond's branches must
        not return their input: an identity shortcut is copied."""
        return torch.cond(a[0] > 0, self.forward, self.skip if self.projects else torch.clone, (x,))


class _Mix(torch.autograd.Function):
    """relu(r + s) where a = 1, s where a = 0, per image (a: (N,) in {0, 1}), bit for bit (lerp is exact at
    a = 0 and 1); the gradient to a is <grad, y - s>, as for y a + s (1 - a). Written out because autograd
    through that expression dispatches about twice the ops backward."""

    @staticmethod
    def forward(ctx, r, s, a):
        y = F.relu(r + s)
        a4 = a.view(-1, 1, 1, 1)
        if a4.dtype != y.dtype:
            a4 = a4.to(y.dtype)
        if s.dtype != y.dtype:
            s = s.to(y.dtype)
        ctx.save_for_backward(y, s, a4)
        return torch.lerp(s, y, a4)

    @staticmethod
    def backward(ctx, grad):
        y, s, a4 = ctx.saved_tensors
        grad_r = torch.ops.aten.threshold_backward(grad * a4, y, 0)  # relu's gradient, where a = 1
        # d/ds = (1 - a) grad + grad_r: grad where a = 0 (grad_r is 0 there), grad_r where a = 1 (exact)
        grad_s = torch.lerp(grad, grad_r, a4)
        grad_a = ((y - s) * grad).sum((1, 2, 3)) if ctx.needs_input_grad[2] else None
        return grad_r, grad_s, grad_a


class ResNet(nn.Module):
    """blocks[0] always runs; blocks[j + 1] is gated by switch j, which sees that block's input; a skipped
    block computes skip(x), so its residual is what skipping saves (utils/flops.py)."""

    def __init__(self, arch):
        super().__init__()
        self.arch = arch
        n = (arch["depth"] - 2) // 6
        ranks = arch.get("ranks", {})
        widths = [w * arch["width"] for w in (16, 32, 64)]
        self.stem = make_conv("stem", ranks, arch.get("in_channels", 3), widths[0], 3)
        self.stem_bn = nn.BatchNorm2d(widths[0])
        blocks = []
        for stage, width in enumerate(widths):
            for b in range(n):
                in_ch = blocks[-1].bn2.num_features if blocks else widths[0]
                stride = 2 if stage > 0 and b == 0 else 1
                blocks.append(BasicBlock(f"blocks.{len(blocks)}", ranks, in_ch, width, stride))
        self.blocks = nn.ModuleList(blocks)
        self.switches = SWITCH_KINDS[arch["gate"]]([block.bn2.num_features for block in blocks[:-1]])  # their inputs
        self.fc = nn.Linear(widths[2], arch["num_classes"])
        self.mode = "hard"
        # auto: masked in training, skipping at inference; or force "mask" / "skip"; "branch": one image per
        # call, each gated block as control flow (forward_branching, for export)
        self.execution = "auto"
        # `open` mode only: None (every block), or a fixed 0/1 per gated block for every image
        self.route = None
        self.explore_bound = 0.1  # `explore` mode: decisions drawn from p clamped to [bound, 1 - bound]
        self.temperature = 1.0  # `gumbel` mode: the temperature of the relaxation that gives the gradient
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    @property
    def num_switches(self):
        return len(self.blocks) - 1

    def forward(self, x, mode=None):
        """Returns (logits, actions, probs), (N, num_switches) each: the 0/1 route each image took and the
        switches' probabilities (in `open` mode ones, and the actions ones or the fixed route)."""
        mode = mode or self.mode
        if mode not in MODES:  # a typo would silently run `hard`'s straight-through gradient
            raise ValueError(f"unknown mode {mode!r} (expected one of {MODES})")
        x = F.relu(self.stem_bn(self.stem(x)))
        x = self.blocks[0](x)
        if mode == "open":
            route = self.route
            for j, block in enumerate(self.blocks[1:]):
                x = block(x) if route is None or route[j] else block.skip(x)
            ones = x.new_ones(x.shape[0], self.num_switches, dtype=torch.float32)
            actions = ones if route is None else ones * torch.as_tensor(route, dtype=torch.float32, device=x.device)
            return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1)), actions, ones
        skipping = self.execution == "skip" or (self.execution == "auto" and not self.training)
        state, actions, probs = None, [], []
        for j, block in enumerate(self.blocks[1:]):
            p, state = self.switches(j, x.detach() if mode == "explore" else x, state)
            a = act(p, mode, self.training, self.explore_bound, self.temperature)
            if self.execution == "branch":
                x = block.forward_branching(x, a.detach())
            else:
                x = block.forward_skipping(x, a.detach()) if skipping else block.forward_masked(x, a)
            actions.append(a)
            probs.append(p)
        logits = self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))
        return logits, torch.stack(actions, 1), torch.stack(probs, 1)


def compile_step(step_fn, device, backend=None):
    """step_fn(model, x, y) with the model compiled by torch.compile (forward and backward). The loss and
    statistics stay eager, so the state stage 3's step keeps between steps never lives in CUDA graphs'
    memory, which the next replay overwrites. Default: on CUDA inductor with CUDA graphs ("reduce-overhead";
    training batches have static shapes), elsewhere "aot_eager" (a check, not a speed-up)."""
    device = torch.device(device)
    if backend is None:
        backend = "inductor" if device.type == "cuda" else "aot_eager"
    mode = "reduce-overhead" if backend == "inductor" and device.type == "cuda" else None
    compiled = {}  # id(model) -> its compiled wrapper (which keeps the model alive: ids stay unique)

    def step(model, x, y):
        fast = compiled.get(id(model))
        if fast is None:
            fast = compiled[id(model)] = torch.compile(model, backend=backend, mode=mode, dynamic=False)
        return step_fn(fast, x, y)

    step.backend, step.mode = backend, mode
    return step


def compile_report(step, say=False):
    """What torch.compile did for a step made by compile_step (None for an eager step): graphs, recompilations,
    whether CUDA graphs ran and why not. `say`: skipped CUDA graphs or recompilations in one line on stderr."""
    if getattr(step, "backend", None) is None:
        return None
    from torch._dynamo.utils import counters, get_compilation_metrics
    metrics = get_compilation_metrics()
    recompiles = [m.recompile_reason for m in metrics if getattr(m, "recompile_reason", None)]
    skips = sorted({m.cudagraph_skip_reason for m in metrics if getattr(m, "cudagraph_skip_reason", None)})
    out = {"backend": step.backend, "mode": step.mode, "graphs": counters["stats"]["unique_graphs"],
           "recompiles": len(recompiles), "recompile_reasons": recompiles[:5], "cuda_graphs": False}
    if step.mode == "reduce-overhead":
        n_skips = counters["inductor"]["cudagraph_skips"]
        out.update(cudagraph_skips=n_skips, cudagraph_skip_reasons=skips[:5], cuda_graphs=n_skips == 0)
    if say and out.get("cudagraph_skips"):
        print(f"warning: --compile: CUDA graphs were skipped {out['cudagraph_skips']} time(s) "
              f"({'; '.join(skips[:2]) or 'reason not recorded'}): the compiled step launches its kernels one by one",
              file=sys.stderr, flush=True)
    if say and recompiles:
        print(f"warning: --compile: {len(recompiles)} recompilation(s) ({recompiles[0]})", file=sys.stderr, flush=True)
    return out
