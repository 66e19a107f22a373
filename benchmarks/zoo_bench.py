"""Zoo train-step speed: a forward+backward+SGD step of a zoo backbone next to the same architecture
built by timm directly (the figure the old ``test_resnet20_speed`` asserted, now measured here).

Both sides start from the same weights and see the same batches; timing rounds alternate which side
goes first; the median step time of each is reported with the ratio timm / visrep (>= 1: the zoo's
uniform wrapper costs nothing). CIFAR ResNets have no timm twin and are reported alone.

    python benchmarks/zoo_bench.py                                   # CPU, batch 64 at 32x32
    python benchmarks/zoo_bench.py --device cuda --batch-size 256 --image-size 224 --small-input False
"""
from __future__ import annotations

import statistics

import torch

from timing import bench_parser, time_steps

PAIRS = [("resnet20", None), ("resnet18", "resnet18"), ("mobilenetv2_100", "mobilenetv2_100")]


def step_fn(model, lr=0.01):
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)

    def step(x, y):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def main(argv=None) -> None:
    p = bench_parser(__doc__.split("\n\n")[0], "cpu", batch_size=64, image_size=32, rounds=8, steps=4)
    p.add_argument("--small-input", type=lambda s: s.lower() in ("1", "true", "yes"), default=True,
                   help="CIFAR stem for the models without a timm twin")
    args = p.parse_args(argv)

    import timm

    from visrep.zoo import create_backbone

    dev = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=g).to(dev),
                torch.randint(0, 10, (args.batch_size,), generator=g).to(dev)) for _ in range(2)]
    print(f"{'model':<18}{'visrep ms':>11}{'timm ms':>10}{'ratio':>8}   (batch {args.batch_size} at "
          f"{args.image_size}px, {args.device}, median of {args.rounds} rounds x {args.steps} steps)")
    for ours_name, timm_name in PAIRS:
        torch.manual_seed(0)
        # a timm twin is the same architecture only with timm's own stem (small_input=False)
        ours = create_backbone(ours_name, num_classes=10, small_input=args.small_input and timm_name is None).to(dev)
        sides = {"visrep": step_fn(ours)}
        if timm_name is not None:
            peer = timm.create_model(timm_name, num_classes=10).to(dev)
            peer.load_state_dict(ours.state_dict())  # same weights: raises if the architectures differ
            sides["timm"] = step_fn(peer)
        for fn in sides.values():  # warm-up
            time_steps(fn, batches, 2, args.device)
        times = {k: [] for k in sides}
        for r in range(args.rounds):
            order = list(sides) if r % 2 == 0 else list(reversed(sides))
            for k in order:
                times[k] += time_steps(sides[k], batches, args.steps, args.device)
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        peer_ms = f"{med['timm']:>10.1f}{med['timm'] / med['visrep']:>8.2f}" if "timm" in med else f"{'-':>10}{'-':>8}"
        print(f"{ours_name:<18}{med['visrep']:>11.1f}{peer_ms}")


if __name__ == "__main__":
    main()
