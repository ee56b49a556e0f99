"""Switches (gates): one before every residual block but the first, deciding per image whether it runs.

A switch looks at the activation entering its block and gives p = P(execute), used by mode:
  open    all blocks run, switches are not evaluated (the dense network)
  hard    execute iff p > 0.5; in training the gradient flows straight through to p (stages 1 and 2)
  greedy  execute iff p > 0.5, no gradient to p (stage 3's fine-tuning of the backbone on the greedy routes)
  sample  a ~ Bernoulli(p), for REINFORCE (gates/policy.py); actions and p are returned, never stashed in the
          module, so that DistributedDataParallel sees a pure function
  explore a ~ Bernoulli(p clamped to [b, 1 - b]), b the model's `explore_bound`, the switches reading their
          inputs detached (gates/counterfactual.py: every route keeps being tried)
  gumbel  in training a ~ Bernoulli(p) by the Gumbel-max trick, the gradient of its relaxation at the model's
          `temperature` backward (gates/gumbel.py); out of training as `greedy`
"""
import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F

from utils.nets import executing

MODES = ("open", "hard", "greedy", "sample", "explore", "gumbel")
SWITCH_KINDS = {}  # the arch's "gate" -> its Switches class (switch_kind registers one)


def switch_kind(name):
    """Class decorator: a Switches subclass becomes the switch kind `name` (the arch's "gate", --gate)."""
    def register(cls):
        SWITCH_KINDS[name] = cls
        return cls
    return register


class Switches(nn.Module):
    """What a switch kind is, and all that the rest of the project asks of one. Built from `channels`, each gated
    block's input width; forward(j, x, state) maps switch j's block input x (N, C_j, H, W) and the previous
    switch's state (None at switch 0) to (p, state), p (N,) the float32 probabilities of executing the block."""

    def logit_layers(self):
        """The layers (each with a bias) whose outputs are the switches' logits: a constant added to their
        biases moves every switch's threshold alike (gates/routes.py's calibration to a FLOPs target)."""
        raise NotImplementedError

    def spread_layers(self):
        """The layers spread_decisions rescales, in this order, each to outputs of mean 0, std 1."""
        return self.logit_layers()


def init_switch_head(head):
    """SkipNet's gate initialisation: N(0, 2 / fan_in) weights, so that the decision depends on the image from
    the first step (a zero weight leaves the LSTM and projections without gradient), and a zero bias (p ~ 0.5)."""
    nn.init.normal_(head.weight, 0.0, (2.0 / head.in_features) ** 0.5)
    nn.init.zeros_(head.bias)


class _ConvLSTMCell(nn.LSTMCell):
    """nn.LSTMCell (same parameters) that on (N, C, 1, 1) tensors runs its matmul as one 1x1 convolution of
    [input, h]: one op each way, where two linear layers' backward are a dozen."""

    def forward(self, input, hx=None, weights=None):
        w, bias = weights if weights is not None else self.conv_weights()
        h = input.new_zeros(input.shape[0], self.hidden_size, 1, 1) if hx is None else hx[0]
        # W_hh h is computed for the zero state too: the FLOPs are those every switch counts
        sig, g = F.conv2d(torch.cat([input, h], 1), w, bias).split([3 * self.hidden_size, self.hidden_size], 1)
        o, i, f = sig.sigmoid().chunk(3, 1)
        c = i * g.tanh() if hx is None else torch.addcmul(f * hx[1], i, g.tanh())  # f * c = 0 for c = 0
        return o * c.tanh(), c

    def conv_weights(self):
        """([W_ih W_hh] as a 1x1 conv's weight, b_ih + b_hh), rows rolled from (i, f, g, o) to (o, i, f, g) so
        that one sigmoid covers three gates. Made once per forward pass, shared by the switches."""
        w = torch.roll(torch.cat([self.weight_ih, self.weight_hh], 1), self.hidden_size, 0)
        return _as_conv(w), torch.roll(self.bias_ih + self.bias_hh, self.hidden_size, 0)


class _ConvHead(nn.Linear):
    """nn.Linear (same parameters) mapping (N, C, 1, 1) to (N, out, 1, 1) by a 1x1 conv (`weight`: if made)."""

    def forward(self, input, weight=None):
        return F.conv2d(input, _as_conv(self.weight) if weight is None else weight, self.bias)


def _as_conv(weight):
    """A linear layer's weight (out, in) as a 1x1 conv's (out, in, 1, 1): one view."""
    return weight.view(*weight.shape, 1, 1)


@switch_kind("rnn")
class RNNSwitches(Switches):
    """SkipNet's recurrent gate: per block pool -> 1x1 conv to a small embedding, one LSTM cell shared by every
    switch (its state runs from block to block) and a linear head to one logit. Kept as (N, C, 1, 1) maps, every
    matmul a 1x1 convolution (_ConvLSTMCell): the switches are most of the ops a step dispatches. The state
    passed on is (h, c, weights), `weights` the LSTM's and head's conv weights, made at the first switch."""

    def __init__(self, channels, embed_dim=10, hidden_dim=10):
        super().__init__()
        self.proj = nn.ModuleList(nn.Conv2d(c, embed_dim, 1, bias=True) for c in channels)
        self.lstm = _ConvLSTMCell(embed_dim, hidden_dim)
        self.head = _ConvHead(hidden_dim, 1)
        init_switch_head(self.head)

    def forward(self, j, x, state):
        e = self.proj[j](F.avg_pool2d(x, x.shape[2:]))  # global mean; backward one op (adaptive: two)
        # The recurrence runs in float32 even under bf16 autocast: its state crosses 14 switches and p is
        # compared with 0.5, so rounding would flip decisions. It costs nothing at this size.
        with autocast_off(x.device.type):
            if e.dtype != torch.float32:
                e = e.float()
            if state is None:
                # A parameter's view made under no_grad has no grad_fn, and module hooks that track gradients
                # (FlopCounterMode's) refuse it among a module's inputs or outputs: the head then views its own.
                head = _as_conv(self.head.weight) if torch.is_grad_enabled() else None
                hx, weights = None, self.lstm.conv_weights() + (head,)
            else:
                hx, weights = state[:2], state[2]
            h, c = self.lstm(e, hx, weights=weights[:2])
            return torch.sigmoid(self.head(h, weight=weights[2])).view(-1), (h, c, weights)

    def logit_layers(self):
        return [self.head]

    def spread_layers(self):
        # each projection first (its embedding spread over the images), then the head they share
        return [*self.proj, self.head]


def autocast_off(device_type):
    """Autocast off, entered only when it is on (entering and leaving costs host time at every switch)."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


@switch_kind("ff")
class FFSwitches(Switches):
    """SkipNet's feed-forward gate: per block 3x3 conv stride 2 + BN + ReLU -> global pool -> linear -> 1."""

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
        logit = self.heads[j](z)
        return torch.sigmoid(logit if logit.dtype == torch.float32 else logit.float()).squeeze(1), state

    def logit_layers(self):
        return list(self.heads)


def act(p, mode, training, bound=0.0, temperature=1.0):
    """0/1 decisions (float, shape of p) from probabilities p in `mode` (module docstring)."""
    if mode in ("sample", "explore"):
        with torch.no_grad():  # no graph node (a detach would be one more op)
            # NaN as 0.5: torch.bernoulli asserts on NaN (on CUDA ending the context); a NaN p comes from a
            # diverged network, whose NaN loss the training loop reports
            p = torch.nan_to_num(p, nan=0.5)
            return torch.bernoulli(p.clamp_(bound, 1 - bound) if mode == "explore" else p)
    if mode == "hard" and training:
        return _StraightThrough.apply(p)
    if mode == "gumbel" and training:
        return gumbel_decisions(p, temperature)
    return (p > 0.5).to(p.dtype)  # a comparison carries no gradient: no detach needed


class _StraightThrough(torch.autograd.Function):
    """Forward the 0/1 value of p > 0.5, backward as if it were p: one op forward, none backward."""

    @staticmethod
    def forward(ctx, p):
        # round(p) is p > 0.5 for p in [0, 1] (0.5 rounds to even: 0), in p's dtype, in one op; a NaN p gives
        # NaN (so does p - p.detach()): the loss is NaN and training stops either way
        return torch.round(p)

    @staticmethod
    def backward(ctx, grad):
        return grad


def gumbel_decisions(p, temperature=1.0, noise=None, eps=1e-6):
    """Straight-through Gumbel-softmax decisions (Jang et al. and Maddison et al., ICLR 2017; ConvNet-AIG's
    gates, Veit & Belongie, ECCV 2018) for two actions, execute and skip. The difference of the two actions'
    Gumbel noises is logistic noise L = log u - log(1 - u), u ~ U(0, 1) (`noise`: given, else drawn), so

      forward   a = [logit(p) + L > 0]                         a ~ Bernoulli(p): the route the image takes
      backward  d a / d logit(p) = s (1 - s) / temperature,    s = sigmoid((logit(p) + L) / temperature)

    (the hard value plus the relaxation minus its detached self: exactly 0 or 1 forward). logit(p) is taken
    of p clamped to [eps, 1 - eps] (float32 holds no larger logit near 1). In float32 even under autocast."""
    with autocast_off(p.device.type):
        p = p if p.dtype == torch.float32 else p.float()
        if noise is None:
            with torch.no_grad():
                u = torch.rand_like(p).clamp_(eps, 1 - eps)
                noise = torch.log(u) - torch.log1p(-u)
        z = torch.logit(p, eps) + noise
        soft = torch.sigmoid(z / temperature)
        return (z > 0).to(p.dtype) + (soft - soft.detach())


def log_prob(p, actions, eps=1e-6):
    """log pi(a) of Bernoulli actions under probabilities p (elementwise)."""
    p = p.clamp(eps, 1 - eps)
    return actions * torch.log(p) + (1 - actions) * torch.log1p(-p)


@torch.no_grad()
def spread_decisions(model, x):
    """Data-dependent start of the switches (Salimans & Kingma's weight-normalisation init): on training images
    `x`, each of the switches' spread_layers in turn rescaled to outputs of mean 0, std 1 per channel, so that
    decisions differ from image to image and sit around p = 0.5 from the first step. Runs the model as training
    does; BN running statistics and the model's mode are restored."""
    buffers = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
    try:
        with executing(model, "mask", training=True):
            for layer in model.switches.spread_layers():
                outputs = []
                hook = layer.register_forward_hook(lambda module, inputs, output: outputs.append(output.detach()))
                model(x, "hard")
                hook.remove()
                _normalise(layer, torch.cat(outputs).flatten(1))  # a shared head is called once per switch
    finally:
        model.load_state_dict(buffers, strict=False)


def _normalise(layer, out, eps=1e-6):
    """Rescale a conv / linear layer (with bias) to outputs `out` (N, C) of mean 0, std 1 per channel; fewer than
    two images or non-finite outputs leave it as it is, and a channel that does not vary is only centred."""
    out = out.float()
    if len(out) < 2 or not torch.isfinite(out).all():
        return
    mean, std = out.mean(0), out.std(0)
    std = torch.where(std > eps, std + eps, torch.ones_like(std))
    shape = (-1,) + (1,) * (layer.weight.dim() - 1)
    layer.weight.div_(std.view(shape))
    layer.bias.sub_(mean).div_(std)
