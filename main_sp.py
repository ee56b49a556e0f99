"""Stage 1: train ResNet + switches end to end (switches in `hard` mode, cross-entropy).
Writes <result_dir>/sp/{checkpoint.pt, metrics.json, tb/}: the row "w/o pruning"."""
import sys

import torch

from models import build_model, make_arch
from utils.checkpoint import load_checkpoint, load_pretrained, model_from_checkpoint
from utils.cli import base_parser, check_ranges
from utils.dist import setup, teardown
from utils.engine import make_scheduler, prepare, supervised_step
from utils.errors import UserError, run_main
from utils.flops import dense_flops, measure_costs
from utils.stage import StageRun, check_batch_shapes, check_result_dir, load_data, restore_training_state, resume_path

LOW_LR = 1e-3  # at or below it, SGD from a random initialisation barely moves in a usual number of epochs


def parse_args(argv=None):
    p = base_parser(__doc__)
    m = p.add_argument_group("model")
    m.add_argument("--network", default="resnet")
    m.add_argument("--depth", type=int, default=32, help="6n+2")
    m.add_argument("--width", type=int, default=4, help="stage widths 16k/32k/64k")
    m.add_argument("--gate", default="rnn", help="switch kind: rnn or ff")
    m.add_argument("--pretrained", default=None, metavar="PATH",
                   help="start from these weights (a checkpoint or a state dict; switches may be missing)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    check_ranges(args)
    if args.lr <= LOW_LR and not args.pretrained and not args.resume and args.epochs > 0:
        print(f"warning: --lr {args.lr:g} is a fine-tuning rate, but no --pretrained weights are given: the network "
              f"trains from scratch (use --lr 0.1, or give --pretrained PATH)", file=sys.stderr, flush=True)
    make_arch(args.network, args.depth, args.width, 1, args.gate)  # flags checked before any work
    check_result_dir(args.result_dir)
    ctx = setup(args.device, args.seed)
    run = StageRun("sp", args.result_dir, ctx)
    ckpt = load_checkpoint(resume_path(args.resume, run), ("sp",), "--resume") if args.resume else None
    data = load_data(args, ctx, recorded=ckpt.get("pipeline") if ckpt else None,
                     source=f"--resume {resume_path(args.resume, run)}" if ckpt else None, resuming=True)
    arch = make_arch(args.network, args.depth, args.width, data.num_classes, args.gate)
    if ckpt:
        differ = [f"{k} {ckpt['arch'].get(k)} vs {v}" for k, v in arch.items() if ckpt["arch"].get(k) != v]
        if differ:
            raise UserError(f"--resume {resume_path(args.resume, run)}: its network differs from the flags' "
                            f"(checkpoint vs flags: {', '.join(differ)})")
        model = model_from_checkpoint(ckpt, resume_path(args.resume, run), "--resume")
    else:
        model = build_model(arch)
        if args.pretrained:
            load_pretrained(model, args.pretrained)
    model, ddp = prepare(model, ctx)
    check_batch_shapes(model, data.image_size, data.train.batch_size)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum,
                                weight_decay=args.weight_decay, nesterov=args.momentum > 0)
    scheduler = make_scheduler(optimizer, args.scheduler, args.epochs, len(data.train))
    start = restore_training_state(ckpt, optimizer, scheduler) if ckpt else 0
    costs = measure_costs(model, data.image_size)
    run.open(data.pipeline)
    run.fit(model=model, ddp=ddp, data=data, optimizer=optimizer, scheduler=scheduler, step_fn=supervised_step,
            epochs=args.epochs, start_epoch=start, costs=costs, payload=lambda e: {"args": vars(args)})
    run.finish(model, ddp, data, costs, {"dense_gflops": dense_flops(costs) / 1e9})
    teardown()


if __name__ == "__main__":
    run_main(main)
