"""Stage 2, step 1: the Kronecker factors of every prunable conv.

For a conv with input channel vectors x (one per kernel position per output location) and per-image loss
gradients s w.r.t. its output (one per output location):
    A = mean of x x^T over images, output locations and kernel positions   (in x in)
    G = mean of s s^T over images and output locations                     (out x out)
and the Fisher of a weight in the eigenbasis is about T * g[i] * a[j], T the number of output locations.

The pass runs the model in eval mode (BN running statistics: each image's gradient is its own) in mode
`open` (the static network) or `hard` (stage 1's routes, masked, so every conv sees every image). Under
`hard` a skipped block's gradient for that image is 0, and those zeros stay in G's average on purpose: they
scale its G by the fraction of images that run it, exactly how much the loss depends on it (A still
averages over all images, a small approximation).
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from models import FactoredConv
from utils.dist import all_reduce_sum
from utils.log import progress as bar
from utils.errors import UserError
from utils.flops import probe
from utils.nets import executing, is_switch, unwrap


@dataclass
class Factors:
    A: torch.Tensor  # (in, in) float64
    G: torch.Tensor  # (out, out) float64
    locations: int   # T: output locations of the conv per image
    in_locations: int = 0  # input locations per image (where a rotation in front of the conv runs)


def prunable_convs(model):
    """name -> conv to decompose: every backbone conv (a factored layer's core); never the classifier or switches."""
    model = unwrap(model)
    factored = {name for name, m in model.named_modules() if isinstance(m, FactoredConv)}
    convs = {}
    for name, m in model.named_modules():
        if name in factored:
            convs[name] = m.core
        elif isinstance(m, nn.Conv2d) and not is_switch(name) and name.rpartition(".")[0] not in factored:
            convs[name] = m
    return convs


def conv_geometry(model, image_size):
    """name -> (input, output) locations per image of every prunable conv at image_size x image_size, for FLOPs."""
    geometry = {}
    probe(model, image_size, prunable_convs(model).items(), lambda n, m, i, o: geometry.__setitem__(
        n, (i[0].shape[-2] * i[0].shape[-1], o.shape[-2] * o.shape[-1])))
    return geometry


def channel_gram(t):
    """sum over images and positions of t[n, :, h, w] t[n, :, h, w]^T, (C, C) float32, in one GEMM."""
    rows = t.float().transpose(0, 1).reshape(t.shape[1], -1)
    return rows @ rows.T


def patch_moment_sum(conv, x):
    """sum of x x^T over the unfolded patches of x without materialising the k*k times larger patch tensor:
    each pixel's outer product weighted by how many patches contain it. Folding all-ones patches counts them
    exactly as F.unfold would cut them (zero padding never counted)."""
    geometry = (conv.kernel_size, conv.dilation, conv.padding, conv.stride)
    patches = F.unfold(torch.ones(1, 1, *x.shape[-2:], device=x.device), *geometry)  # 0 where padded
    return channel_gram(x * F.fold(patches, x.shape[-2:], *geometry).sqrt())


def evenly_spaced(loader, count):
    """`count` batches of `loader` spread evenly over it, so that a loader in file order still contributes every
    class (batches are independent in eval mode)."""
    total = len(loader)
    count = min(count, total)
    chosen = {round(i * (total - 1) / max(1, count - 1)) for i in range(count)} if count > 1 else {0}
    for i, batch in enumerate(loader):
        if i in chosen:
            yield batch


def collect_factors(model, batches, fisher_type="true", num_batches=None, progress=True, mode="open"):
    """{name: Factors} of every prunable conv over `batches` of (x, y), all ranks together. fisher_type
    "true": labels sampled from the model's softmax (global RNG); "empirical": the real y."""
    model = unwrap(model)
    convs = prunable_convs(model)
    device = next(model.parameters()).device
    # products in float32 per batch, accumulated over batches in float64
    a_sums = {n: torch.zeros(c.in_channels, c.in_channels, dtype=torch.float64, device=device)
              for n, c in convs.items()}
    g_sums = {n: torch.zeros(c.out_channels, c.out_channels, dtype=torch.float64, device=device)
              for n, c in convs.items()}
    locations, in_locations = {}, {}

    def forward_hook(name):
        def add_g(s):  # returns None: the gradient itself flows on unchanged
            g_sums[name] += channel_gram(s)

        def hook(conv, inputs, output):
            a_sums[name] += patch_moment_sum(conv, inputs[0].detach())
            locations[name] = output.shape[-2] * output.shape[-1]
            in_locations[name] = inputs[0].shape[-2] * inputs[0].shape[-1]
            output.register_hook(add_g)
        return hook

    hooks = [conv.register_forward_hook(forward_hook(name)) for name, conv in convs.items()]
    grad_flags = [p.requires_grad for p in model.parameters()]
    images = 0
    try:
        # Gradients only w.r.t. activations: autograd.grad towards the input skips every weight gradient.
        for p in model.parameters():
            p.requires_grad_(False)
        with executing(model, "mask", training=False):
            for x, y in bar(batches, progress, total=num_batches, desc="factor pass"):
                x = x.detach().float().requires_grad_(True)
                logits = model(x, mode)[0].float()
                if fisher_type == "true":
                    y = torch.multinomial(logits.detach().softmax(1), 1).squeeze(1)
                # reduction "sum": the gradient of every image's own loss, as if the batch mean were scaled
                # by the batch size, so G does not depend on the batch size
                torch.autograd.grad(F.cross_entropy(logits, y, reduction="sum"), x)
                images += x.shape[0]
    finally:
        for h in hooks:
            h.remove()
        for p, flag in zip(model.parameters(), grad_flags):
            p.requires_grad_(flag)
    images = int(all_reduce_sum(torch.tensor(float(images), device=device)).item())
    if images == 0:
        raise UserError("the factor pass saw no images (fisher_batches or the training set is empty)")
    factors = {}
    for name, conv in convs.items():
        kernel_positions = conv.kernel_size[0] * conv.kernel_size[1]
        t = locations[name]
        factors[name] = Factors(A=all_reduce_sum(a_sums[name]).cpu() / (images * t * kernel_positions),
                                G=all_reduce_sum(g_sums[name]).cpu() / (images * t), locations=t,
                                in_locations=in_locations[name])
    return factors
