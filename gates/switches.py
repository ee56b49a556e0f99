"""Switches (gates): one before every residual block but the first, deciding per image whether it runs.

A switch looks at the activation entering its block and gives p = P(execute). What is done with p
depends on the mode:
  open    all blocks run, switches are not evaluated (the dense network)
  hard    execute iff p > 0.5; in training the 0/1 value goes forward and the gradient flows to p
          (straight-through)
  greedy  execute iff p > 0.5, no gradient to p (stage 3's fine-tuning of the backbone on the greedy routes)
  sample  a ~ Bernoulli(p), for REINFORCE; the actions and p are returned by the model's forward
          (never stashed in the module, so that DistributedDataParallel sees a pure function)
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

MODES = ("open", "hard", "greedy", "sample")
KINDS = ("rnn", "ff")


def init_switch_head(head):
    """SkipNet's gate initialisation (Wang et al., ECCV 2018, code release): random weights, so that the
    decision depends on the image from the first step, and here a zero bias, so that decisions sit around
    p = 0.5. SkipNet draws N(0, 2 / (fan_in * fan_out)) for its gates' heads; with one output that is
    N(0, 2 / fan_in), the He scale, which keeps the logit's spread the same for narrow and wide gates.
    The switches' 1x1 projections and 3x3 convs get He's fan-out init with every conv of the network
    (models/resnet.py), which is SkipNet's too; the LSTM keeps PyTorch's uniform init, as in SkipNet.
    A head that starts at weight 0 (a constant p) would leave the LSTM and projections without gradient."""
    nn.init.normal_(head.weight, 0.0, (2.0 / head.in_features) ** 0.5)
    nn.init.zeros_(head.bias)


class RNNSwitches(nn.Module):
    """SkipNet's recurrent gate: per block pool -> 1x1 conv to a small embedding, then one LSTM cell shared
    by every switch of the network (its state runs from block to block within one forward pass) and a
    linear head to one logit. Nearly free: a few thousand FLOPs per switch."""

    def __init__(self, channels, embed_dim=10, hidden_dim=10):
        super().__init__()
        self.proj = nn.ModuleList(nn.Conv2d(c, embed_dim, 1, bias=True) for c in channels)
        self.lstm = nn.LSTMCell(embed_dim, hidden_dim)
        self.head = nn.Linear(hidden_dim, 1)
        init_switch_head(self.head)

    def forward(self, j, x, state):
        e = self.proj[j](F.adaptive_avg_pool2d(x, 1)).flatten(1)
        # The recurrence runs in float32 even under bf16 autocast: its state crosses 14 switches and p is
        # compared with 0.5, so rounding would flip decisions. It costs nothing at this size.
        with torch.autocast(x.device.type, enabled=False):
            h, c = self.lstm(e.float(), state)
            return torch.sigmoid(self.head(h)).squeeze(1), (h, c)


class FFSwitches(nn.Module):
    """SkipNet's feed-forward gate: per block 3x3 conv stride 2 + BN + ReLU -> global pool -> linear -> 1.
    About an eighth of a block's FLOPs, and they are counted."""

    def __init__(self, channels):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(c, c, 3, stride=2, padding=1, bias=False) for c in channels)
        self.bns = nn.ModuleList(nn.BatchNorm2d(c) for c in channels)
        self.heads = nn.ModuleList(nn.Linear(c, 1) for c in channels)
        for head in self.heads:
            init_switch_head(head)

    def forward(self, j, x, state):
        z = F.relu(self.bns[j](self.convs[j](x)))
        z = F.adaptive_avg_pool2d(z, 1).flatten(1)
        return torch.sigmoid(self.heads[j](z).float()).squeeze(1), state


def build_switches(kind, channels):
    if kind == "rnn":
        return RNNSwitches(channels)
    if kind == "ff":
        return FFSwitches(channels)
    raise ValueError(f"unknown switch kind {kind!r} (expected one of {KINDS})")


def act(p, mode, training):
    """0/1 execution decisions (float, shape of p) from probabilities p: `sample` draws them, `hard` and
    `greedy` take p > 0.5. In training, `hard` passes gradients straight through to p (SkipNet's supervised
    phase: the switches and, through their inputs, the backbone learn the routes); `greedy` passes none (the
    routes are fixed functions of the features: stage 3's route fine-tuning trains the backbone on them
    without teaching it to turn blocks back on through the switches' inputs)."""
    if mode == "sample":
        return torch.bernoulli(p.detach())
    hard = (p > 0.5).to(p.dtype)
    if mode == "greedy":
        return hard.detach()
    # Straight-through: forward the 0/1 value, backward as if it were p. (p - p.detach()) is exactly 0, so
    # the forward value is exactly 0 or 1 (hard + p - p.detach() rounds 1 + p - p to 0.99999994 at times).
    return hard + (p - p.detach()) if training else hard


def log_prob(p, actions, eps=1e-6):
    """log pi(a) of Bernoulli actions under probabilities p (elementwise)."""
    p = p.clamp(eps, 1 - eps)
    return actions * torch.log(p) + (1 - actions) * torch.log1p(-p)


@torch.no_grad()
def spread_decisions(model, x):
    """Data-dependent start of the switches (the weight-normalisation init of Salimans & Kingma, NeurIPS
    2016, applied to them), after SkipNet's random init: on training images `x` (N, C, H, W), rescale so
    that every switch's input to its decision varies over the images with unit spread and its logit has
    mean 0 and std 1 over the batch. So decisions differ from image to image and sit around p = 0.5 from
    the first step, whatever the scale of the activations a switch sees (with random weights alone, the
    pooled activations of a block vary so little over images that p does, by a few thousandths).
      rnn: each 1x1 projection's output channels -> mean 0, std 1; then the shared head -> logits of all
           switches mean 0, std 1.
      ff:  each head -> its logits mean 0, std 1.
    N should be large enough to measure a spread (main_sp.py gives up to 256 images, whatever --bs); with
    N = 1 the switches keep their random init (see _normalise: no weight is ever made non-finite).
    Runs the model as training does (batch statistics in BN, masked execution, `hard` switches); the BN
    running statistics and the model's mode are restored after."""
    switches, was_training, execution = model.switches, model.training, model.execution
    buffers = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
    model.train()
    model.execution = "mask"
    seen = {}

    def capture(name):
        return lambda module, inputs, output: seen.__setitem__(name, (inputs[0].detach(), output.detach()))

    try:
        if isinstance(switches, RNNSwitches):
            for j, proj in enumerate(switches.proj):
                hook = proj.register_forward_hook(capture("proj"))
                model(x, "hard")
                hook.remove()
                _normalise(proj, seen["proj"][1].flatten(1))
            logits = []
            hook = switches.head.register_forward_hook(
                lambda module, inputs, output: logits.append(output.detach()))
            model(x, "hard")
            hook.remove()
            _normalise(switches.head, torch.cat(logits))
        else:
            for head in switches.heads:
                hook = head.register_forward_hook(capture("head"))
                model(x, "hard")
                hook.remove()
                _normalise(head, seen["head"][1])
    finally:
        model.load_state_dict(buffers, strict=False)
        model.train(was_training)
        model.execution = execution


def _normalise(layer, out, eps=1e-6):
    """Rescale a conv / linear layer (with bias) so that its outputs `out` (N, C) become mean 0, std 1 per
    output channel. Never makes a weight non-finite: with fewer than two images (no spread to measure) or
    non-finite outputs the layer is left as it is, and a channel that does not vary (std <= eps) is only
    centred, not scaled."""
    out = out.float()
    if len(out) < 2 or not torch.isfinite(out).all():
        return
    mean, std = out.mean(0), out.std(0)
    std = torch.where(std > eps, std + eps, torch.ones_like(std))
    shape = (-1,) + (1,) * (layer.weight.dim() - 1)
    layer.weight.div_(std.view(shape))
    layer.bias.sub_(mean).div_(std)
