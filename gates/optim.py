"""The optimizer of stages 1 and 3: SGD with the switches in their own parameter group (switch_lr,
switch_weight_decay; by default the backbone's), always two groups, so that a checkpoint's optimizer state
fits whatever the flags."""
from runtime.loop import sgd
from utils.nets import is_switch, unwrap


def trainable(model):
    """(backbone, switches): the model's parameters that train, the switches' apart."""
    named = [(n, p) for n, p in unwrap(model).named_parameters() if p.requires_grad]
    return [p for n, p in named if not is_switch(n)], [p for n, p in named if is_switch(n)]


def make_optimizer(model, args):
    """runtime.loop.sgd over the trainable parameters: group 0 the backbone, group 1 the switches."""
    backbone, switches = trainable(model)
    lr = args.switch_lr if args.switch_lr is not None else args.lr
    wd = args.switch_weight_decay if args.switch_weight_decay is not None else args.weight_decay
    return sgd([{"params": backbone}, {"params": switches, "lr": lr, "weight_decay": wd}], args.lr, args.momentum,
               args.weight_decay)
