"""Is visrep's method the same function as lightly's? Same weights in, same loss, gradient and trajectory out.

``ssl_bench.py`` compares the two implementations of each method by training both from the same backbone
and data order. Their heads are initialised by each library's own code, and float rounding makes the two
runs part within a few steps (LARS amplifies it), so a per-seed difference there mixes what the
implementations compute with chance. This script separates the two:

1. It builds both sides as ``ssl_bench.py`` does (ours: ``build_method`` + the recipe's ``ssl_loss`` + the
   EMA and teacher-temperature schedules; lightly's heads, losses and ``update_momentum``), with visrep set
   to lightly's structure where the preset differs from it on purpose (``STRUCTURE``: SimCLR one view at
   a time with an affine output BN, MoCo v3 with affine output BNs, DINO one crop at a time).
2. It copies lightly's head weights into ours, module by module (the teachers start as copies of the
   students on both sides). A bias that only one side has is set to zero; it is followed by a BatchNorm or
   its loss ignores a constant shift (VICReg, Barlow Twins), and its gradient is reported.
3. One training step on the same random views: the loss and every parameter's gradient, in float64 (the
   same function agrees to rounding, about 1e-15) and in float32.
4. ``--steps`` optimizer steps with the preset's optimizer (LARS at the preset's base rate, no warm-up):
   how far apart the two backbones end, relative to how far they moved, in float64 and in float32; and, in
   float32, how far visrep ends from itself with its first weight nudged by one ulp -- the spread that
   float rounding alone gives, against which the visrep - lightly distance is read.

    python benchmarks/ssl_parity.py                     # every method
    python benchmarks/ssl_parity.py --methods dino --steps 20
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ssl_bench  # noqa: E402  (the two implementations, as the benchmark builds them)

METHODS = ssl_bench.METHODS
# visrep's settings that give lightly's structure where the preset keeps the paper's (README, "Against lightly")
STRUCTURE = {"simclr": ("simclr.joint_batch=False", "simclr.proj_last_bn=True", "simclr.last_bn_affine=True"),
             "mocov3": ("mocov3.last_bn_affine=True",), "dino": ("dino.joint_batch=False",),
             "vicreg": (), "barlow": ()}


class Recording:
    """Wraps an optimizer: keeps a copy of every gradient at each ``step`` (before the update)."""

    def __init__(self, opt: torch.optim.Optimizer):
        self.opt, self.grads = opt, {}

    def __getattr__(self, name):
        return getattr(self.__dict__["opt"], name)

    def step(self, closure=None):
        self.grads = {p: p.grad.detach().clone() for g in self.opt.param_groups for p in g["params"]
                      if p.grad is not None}
        return self.opt.step(closure)

    def zero_grad(self, set_to_none: bool = True):
        self.opt.zero_grad(set_to_none=set_to_none)


def head_pairs(method: str, ours: nn.Module, peer: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    """(ours, lightly's) head modules that hold parameters, in order."""
    if method == "mocov3":
        mine, theirs = [ours.projector, ours.predictor], [peer.head, peer.predictor]
    elif method == "dino":
        mine, theirs = [ours.head], [peer.head]
    else:
        mine, theirs = [ours.projector], [peer.head]
    leaves = lambda mods: [m for mod in mods for m in mod.modules() if any(True for _ in m.parameters(False))]  # noqa: E731
    a, b = leaves(mine), leaves(theirs)
    kinds = lambda ms: ["WN" if hasattr(m, "weight_g") else type(m).__name__ for m in ms]  # noqa: E731
    if kinds(a) != kinds(b):
        raise SystemExit(f"error: {method}: the heads differ in structure ({kinds(a)} vs {kinds(b)}); "
                         "the parity check needs lightly's structure on visrep's side (STRUCTURE)")
    return list(zip(a, b))


def copy_heads(method: str, net: nn.Module, model: nn.Module) -> tuple[list, list]:
    """Lightly's head weights into ours; returns the (ours, lightly's) parameter pairs of the backbone and
    the heads, and the parameters only one side has (zeroed)."""
    pairs, extra = [], []
    for (name, p), (name2, q) in zip(net.backbone.named_parameters(), model.backbone.named_parameters()):
        assert name == name2 and torch.equal(p, q), name
        pairs.append((f"backbone.{name}", p, q))
    for i, (a, b) in enumerate(head_pairs(method, net, model)):
        pa, pb = dict(a.named_parameters(recurse=False)), dict(b.named_parameters(recurse=False))
        for key in sorted(set(pa) | set(pb)):
            with torch.no_grad():
                if key in pa and key in pb:
                    pa[key].copy_(pb[key])
                    pairs.append((f"head[{i}].{key}", pa[key], pb[key]))
                else:
                    only = pa.get(key, pb.get(key))
                    only.zero_()
                    extra.append((f"head[{i}].{key} ({'visrep' if key in pa else 'lightly'} only)", only))
    with torch.no_grad():  # the teachers start as the students, on both sides
        if method == "dino":
            net.teacher_head.load_state_dict(net.head.state_dict())
            model.head_momentum.load_state_dict(model.head.state_dict())
        if method == "mocov3":
            net.target_projector.load_state_dict(net.projector.state_dict())
            model.head_momentum.load_state_dict(model.head.state_dict())
    return pairs, extra


def flat(tensors) -> torch.Tensor:
    """The tensors as one vector, in order."""
    return torch.cat([t.detach().flatten() for t in tensors])


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def compare(method: str, dtype: torch.dtype, steps: int, accelerator, seed: int = 0, nudge: bool = False) -> dict:
    from visrep.ssl import build_backbone, build_ssl_optimizer

    torch.set_default_dtype(dtype)
    try:
        cfg = ssl_bench.preset(method)
        vcfg = ssl_bench.preset(method, sets=STRUCTURE[method]) if STRUCTURE[method] else cfg
        torch.manual_seed(seed)
        backbone = build_backbone(cfg.model)
        opts = []

        def make_opt(mo):
            opts.append(Recording(build_ssl_optimizer(mo, cfg.optim, cfg.run.batch_size, predictor_prefix="predictor.")))
            return opts[-1]

        step_o, _, model_o, _ = ssl_bench.ours(vcfg, backbone, make_opt, accelerator, 10_000)
        step_l, _, model_l, _ = ssl_bench.peer(cfg, backbone, make_opt, torch.device("cpu"), 10_000)
        net = accelerator.unwrap_model(model_o)
        pairs, extra = copy_heads(method, net, model_l)
        start = [q.detach().clone() for _, _, q in pairs]
        control = None
        if nudge:
            step_c, _, model_c, _ = ssl_bench.ours(vcfg, backbone, make_opt, accelerator, 10_000)
            net_c = accelerator.unwrap_model(model_c)
            with torch.no_grad():
                net_c.load_state_dict(net.state_dict())  # ours after the copy: student, teacher, centre
                w = next(net_c.backbone.parameters())
                w.copy_(torch.nextafter(w, torch.full_like(w, float("inf"))))
            control = (step_c, net_c.backbone)
        g = torch.Generator().manual_seed(seed)
        out = {}
        for k in range(max(steps, 1)):
            views = [v.to(dtype) for v in ssl_bench.random_views(cfg, cfg.run.batch_size, "cpu", g)]
            lo, ll = step_o(views).detach(), step_l(views).detach()
            if k == 0:
                out["loss"] = (float(lo), float(ll))
                grads = [(name, opts[0].grads.get(p), opts[1].grads.get(q)) for name, p, q in pairs]
                missing = [name for name, a, b in grads if (a is None) != (b is None)]
                if missing:
                    raise SystemExit(f"error: {method}: only one side has a gradient for {missing}")
                both = [(name, a, b) for name, a, b in grads if b is not None]
                lightly_grad = flat(b for _, _, b in both)
                out["grad_all"] = rel(flat(a for _, a, _ in both), lightly_grad)
                # a tensor whose gradient is zero but for rounding (< 1e-6 of the whole) has no relative error
                floor = 1e-6 * lightly_grad.norm()
                out["tiny"] = [name for name, _, b in both if b.norm() < floor]
                out["grad"] = max((rel(a, b), name) for name, a, b in both if name not in out["tiny"])
                seen = {**opts[0].grads, **opts[1].grads}
                out["extra_grad"] = max([float(seen[p].abs().max()) for _, p in extra if p in seen] or [0.0])
            if control is not None:
                control[0](views)
        with torch.no_grad():
            bb = [(p, q, s) for (name, p, q), s in zip(pairs, start) if name.startswith("backbone.")]
            visrep_w, lightly_w = flat(p for p, _, _ in bb), flat(q for _, q, _ in bb)
            moved = (lightly_w - flat(s for _, _, s in bb)).norm()
            out["backbone_apart"] = float((visrep_w - lightly_w).norm() / moved)
            if control is not None:  # the same code, its first weight nudged by one ulp: rounding alone
                out["control_apart"] = float((flat(control[1].parameters()) - visrep_w).norm() / moved)
        out["extra"] = [name for name, _ in extra]
        return out
    finally:
        torch.set_default_dtype(torch.float32)


def main(argv=None):
    from accelerate import Accelerator

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--steps", type=int, default=10, help="optimizer steps for the trajectory comparison")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error(f"--steps {args.steps}: give at least one step")
    if importlib.util.find_spec("lightly") is None:
        raise SystemExit("error: lightly is not installed: pip install -e '.[bench]'")
    accelerator = Accelerator(cpu=True)
    print(f"visrep vs lightly from the same weights (lightly's heads copied into ours), the preset's heads, batch 64, "
          f"seed {args.seed}; trajectory: {args.steps} LARS steps at the preset's base rate\n")
    head = (f"{'method':<8}{'dtype':>9}{'loss visrep':>15}{'loss lightly':>15}{'loss rel diff':>15}"
            f"{'grad rel diff':>15}{'worst parameter':>17}  {'(which)':<28}{'backbones apart':>16}{'visrep 1-ulp':>17}")
    print(head)
    rows = {}
    for method in args.methods:
        for dtype in (torch.float64, torch.float32):
            r = compare(method, dtype, args.steps, accelerator, args.seed, nudge=dtype == torch.float32)
            rows[(method, str(dtype))] = r
            lo, ll = r["loss"]
            print(f"{method:<8}{str(dtype).replace('torch.', ''):>9}{lo:>15.8f}{ll:>15.8f}{abs(lo - ll) / abs(ll):>15.1e}"
                  f"{r['grad_all']:>15.1e}{r['grad'][0]:>17.1e}  {r['grad'][1]:<28}{r['backbone_apart']:>16.1e}"
                  + (f"{r['control_apart']:>17.1e}" if "control_apart" in r else ""))
        if r["tiny"]:
            print(f"{'':<8}left out of the worst parameter, gradient under 1e-6 of the whole: {', '.join(r['tiny'])}")
        if r["extra"]:
            print(f"{'':<8}zeroed, one side only: {', '.join(r['extra'])}; largest gradient there "
                  f"{r['extra_grad']:.1e}")
    print("\ngrad rel diff: ||g_visrep - g_lightly|| / ||g_lightly|| over every parameter both have (worst "
          "parameter: the largest such ratio of one tensor);")
    print("backbones apart: ||w_visrep - w_lightly|| / ||w_lightly - w_start|| of the backbone's weights after the "
          "steps;\nvisrep 1-ulp: the same for visrep against visrep with its first weight nudged by one ulp (float "
          "rounding alone)")
    return rows


if __name__ == "__main__":
    main()
