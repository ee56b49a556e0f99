"""A network as every layer handles it: unwrapped from DistributedDataParallel, run for a while in another
execution (how its gated blocks run) or training mode, its switches told apart from the backbone by name."""
import contextlib

SWITCHES = "switches."  # the name prefix of the switches' parameters and modules (the model's `switches`)


def unwrap(model):
    """The network itself, under torch.compile's and DDP's wrappers (itself when unwrapped)."""
    for wrapper in ("_orig_mod", "module"):
        model = getattr(model, wrapper, model)
    return model


def is_switch(name):
    """Whether a parameter, buffer or module named `name` (model.named_parameters() etc.) is a switch's."""
    return name.startswith(SWITCHES)


@contextlib.contextmanager
def executing(model, execution=None, training=None):
    """`model` with its gated blocks run as `execution` and in training mode or not (`training`) inside (None:
    as it is), both restored on leaving. Yields the unwrapped network."""
    net = unwrap(model)
    was_training, before = net.training, net.execution
    try:
        if training is not None:
            net.train(training)
        if execution is not None:
            net.execution = execution
        yield net
    finally:
        net.execution = before
        net.train(was_training)
