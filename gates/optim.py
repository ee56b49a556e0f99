"""The optimizer of stages 1 and 3: SGD with the switches in their own parameter group, so that they may get
their own learning rate and weight decay (the switch_lr, switch_weight_decay settings; by default the
backbone's, the original behaviour). Two groups always, so that a checkpoint's optimizer state fits whatever the flags."""
import torch


def make_optimizer(model, args):
    """SGD (nesterov when momentum > 0) over the trainable parameters: group 0 the backbone, group 1 the
    switches (names starting with "switches.")."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    backbone = [p for n, p in named if not n.startswith("switches.")]
    switches = [p for n, p in named if n.startswith("switches.")]
    lr = args.switch_lr if args.switch_lr is not None else args.lr
    wd = args.switch_weight_decay if args.switch_weight_decay is not None else args.weight_decay
    return torch.optim.SGD([{"params": backbone}, {"params": switches, "lr": lr, "weight_decay": wd}],
                           lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay,
                           nesterov=args.momentum > 0)
