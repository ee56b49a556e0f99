"""Stage 2, steps 2, 3, 4 and 6: eigenbases of the Kronecker factors, the weights rotated into them, the
OBD score of every direction, and the rebuild of pruned convs as rot_in (1x1) -> core (k x k) -> rot_out
(1x1). Everything here runs on the CPU in float64: the matrices are small."""
from dataclasses import dataclass

import torch

from models import FactoredConv, build_model
from pruners.kfac import conv_geometry, prunable_convs
from utils.errors import UserError
from utils.nets import unwrap

RETRIES = 4  # eigh attempts, damping raised tenfold each time (at least to 1e-6 of the mean eigenvalue)


@dataclass
class Layer:
    """One prunable conv in its factors' eigenbasis (a factored one's core, rot_in / rot_out kept to compose)."""
    name: str
    q_in: torch.Tensor        # (n_in, n_in) eigenvectors of A as columns
    q_out: torch.Tensor       # (n_out, n_out) eigenvectors of G as columns
    weight: torch.Tensor      # W' = Q_G^T W Q_A at every kernel position, (n_out, n_in, kh, kw)
    in_scores: torch.Tensor   # (n_in,) score of every input direction
    out_scores: torch.Tensor  # (n_out,)
    channels: tuple           # (C_in, C_out) of the whole layer: what its BN and neighbours see
    params: int               # parameters the layer holds now
    locations: int           # T, the output locations per image that scale its scores
    geometry: tuple = (1, 1)  # (input, output) locations per image: where rot_in and core / rot_out run
    rot_in: torch.Tensor = None   # (n_in, C_in) rotation in front of the core, if already factored
    rot_out: torch.Tensor = None  # (C_out, n_out)

    def cost(self, r_in, r_out):
        """(parameters, FLOPs per image) of the layer keeping r_in input and r_out output directions: the
        core, plus a 1x1 rotation on each side that keeps fewer than all (rot_in at the input's resolution)."""
        kh, kw = self.weight.shape[2:]
        (c_in, c_out), (l_in, l_out) = self.channels, self.geometry
        params = r_in * r_out * kh * kw
        macs = params * l_out
        if r_in < c_in:
            params, macs = params + r_in * c_in, macs + r_in * c_in * l_in
        if r_out < c_out:
            params, macs = params + r_out * c_out, macs + r_out * c_out * l_out
        return params, 2 * macs

    @property
    def ranks(self):  # the directions the layer holds now
        return len(self.in_scores), len(self.out_scores)

    @property
    def flops(self):
        return self.cost(*self.ranks)[1]

    def direction_costs(self, per):
        """(input, output): what one direction of each side costs at the present ranks, its row of the
        rotation plus its slice of the core, in parameters (per="params") or FLOPs per image ("flops")."""
        kh, kw = self.weight.shape[2:]
        (c_in, c_out), (l_in, l_out), (n_in, n_out) = self.channels, self.geometry, self.ranks
        if per == "params":
            return c_in + n_out * kh * kw, n_in * kh * kw + c_out
        return 2 * (c_in * l_in + n_out * kh * kw * l_out), 2 * (n_in * kh * kw + c_out) * l_out


def eigenbasis(factor, damping, what):
    """(eigenvalues, eigenvectors) of a PSD factor in float64, damped relative to its mean eigenvalue."""
    m = factor.double()
    m = (m + m.T) / 2
    if not torch.isfinite(m).all():
        raise UserError(f"{what} is not finite (NaN/inf activations or gradients: did stage 1 diverge?)")
    mean = m.diagonal().mean()
    eye = torch.eye(m.shape[0], dtype=torch.float64)
    for _ in range(RETRIES):
        try:
            values, vectors = torch.linalg.eigh(m + damping * mean * eye)
            if torch.isfinite(values).all() and torch.isfinite(vectors).all():
                return values.clamp_min(0), vectors  # rounding can leave -1e-17 where 0 is meant
        except torch.linalg.LinAlgError:
            pass
        tried, damping = damping, max(10 * damping, 1e-6)
    raise UserError(f"eigendecomposition of {what} failed even with damping {tried:g}; raise 'damping' in "
                    f"the config")


def rotate(weight, q_in, q_out):
    """W' = Q_G^T W Q_A at every kernel position."""
    return torch.einsum("oikl,op,iq->pqkl", weight, q_out, q_in)


def in_eigenbasis(name, module, q_in, q_out, a, g, locations, geometry):
    """The Layer of `module` in the bases q_in / q_out of eigenvalues a / g. Scores: the OBD estimate of the
    loss increase when weight (i, j) of the eigenbasis is removed, 1/2 T g[i] a[j] sum_kl W'[i, j]^2."""
    factored = isinstance(module, FactoredConv)
    conv = module.core if factored else module
    weight = rotate(conv.weight.detach().double().cpu(), q_in, q_out)
    s = 0.5 * locations * g[:, None] * a[None, :] * weight.square().sum((2, 3))
    flat = lambda c: None if c is None else c.weight.detach().double().cpu().flatten(1)  # noqa: E731
    if factored:
        channels, rot_in, rot_out = module.channels, flat(module.rot_in), flat(module.rot_out)
    else:
        channels, rot_in, rot_out = (conv.in_channels, conv.out_channels), None, None
    return Layer(name=name, q_in=q_in, q_out=q_out, weight=weight, in_scores=s.sum(0), out_scores=s.sum(1),
                 channels=channels, params=sum(p.numel() for p in module.parameters()), locations=locations,
                 geometry=geometry, rot_in=rot_in, rot_out=rot_out)


def decompose(model, factors, damping):
    """[Layer] of every conv that has factors (see kfac.collect_factors)."""
    model = unwrap(model)
    modules = dict(model.named_modules())
    layers = []
    for name, f in factors.items():
        a, q_in = eigenbasis(f.A, damping, f"factor A of {name}")
        g, q_out = eigenbasis(f.G, damping, f"factor G of {name}")
        layers.append(in_eigenbasis(name, modules[name], q_in, q_out, a, g, f.locations,
                                    (f.in_locations, f.locations)))
    return layers


def in_channel_basis(model, image_size=32):
    """[Layer] of every prunable conv in its own channel basis, each direction scored by its squared weight
    magnitude: what a layer can lose, whatever the scores. FLOPs at image_size x image_size inputs."""
    model = unwrap(model)
    modules = dict(model.named_modules())
    geometry = conv_geometry(model, image_size)
    eye = lambda n: torch.eye(n, dtype=torch.float64)  # noqa: E731
    ones = lambda n: torch.ones(n, dtype=torch.float64)  # noqa: E731
    return [in_eigenbasis(name, modules[name], eye(conv.in_channels), eye(conv.out_channels),
                          ones(conv.in_channels), ones(conv.out_channels), 1, geometry[name])
            for name, conv in prunable_convs(model).items()]


def top_directions(layer, r_in, r_out):
    """Indices (ascending) of the r_in / r_out highest-scoring input / output directions of `layer`."""
    return (layer.in_scores.topk(r_in).indices.sort().values,
            layer.out_scores.topk(r_out).indices.sort().values)


def rebuild(model, layers, keep):
    """A new model in which every layer in `keep` ({name: (input indices, output indices)}) is a FactoredConv
    holding those directions, composed with its rotations (at most three convs deep however often pruned), a
    full side's square rotation multiplied into the core; everything else copied unchanged."""
    model = unwrap(model)
    layers = {layer.name: layer for layer in layers}
    state = model.state_dict()
    ranks = dict(model.arch.get("ranks", {}))
    for name, (kept_in, kept_out) in keep.items():
        layer = layers[name]
        dtype = state[f"{name}.core.weight" if f"{name}.core.weight" in state else f"{name}.weight"].dtype
        rot_in = layer.q_in[:, kept_in].T                   # (r_in, n_in)
        rot_out = layer.q_out[:, kept_out]                  # (n_out, r_out)
        if layer.rot_in is not None:
            rot_in = rot_in @ layer.rot_in                  # (r_in, C_in)
        if layer.rot_out is not None:
            rot_out = layer.rot_out @ rot_out               # (C_out, r_out)
        core = layer.weight[kept_out][:, kept_in]           # (r_out, r_in, kh, kw)
        for key in ("weight", "rot_in.weight", "core.weight", "rot_out.weight"):
            state.pop(f"{name}.{key}", None)
        c_in, c_out = layer.channels
        if len(kept_in) == c_in:
            core = torch.einsum("oikl,ic->ockl", core, rot_in)
        else:
            state[f"{name}.rot_in.weight"] = rot_in[:, :, None, None].to(dtype)
        if len(kept_out) == c_out:
            core = torch.einsum("po,oikl->pikl", rot_out, core)
        else:
            state[f"{name}.rot_out.weight"] = rot_out[:, :, None, None].to(dtype)
        state[f"{name}.core.weight"] = core.to(dtype)
        ranks[name] = [len(kept_in), len(kept_out)]
    new = build_model({**model.arch, "ranks": ranks})
    new.load_state_dict(state)
    new.to(next(model.parameters()).device)
    new.train(model.training)
    new.mode, new.execution = model.mode, model.execution
    return new


def set_rotations_trainable(model, trainable):
    """fix_rotation: freeze (or thaw) the 1x1 rotations of every factored conv."""
    for m in unwrap(model).modules():
        if isinstance(m, FactoredConv):
            for conv in (m.rot_in, m.rot_out):
                if conv is not None:
                    conv.weight.requires_grad_(trainable)

