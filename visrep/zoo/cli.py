"""``visrep zoo list|summary`` and ``visrep viz gradcam|features|attention`` (see ``visrep.cli``).

Argument parsing only here; the work is done by importable functions in ``visrep.zoo``
(``list_backbones``, ``summary.summarize``, ``viz.save_*``). Heavy imports happen in the handlers.
"""
from __future__ import annotations

import argparse
import sys


def register(subparsers) -> None:
    _register_zoo(subparsers)
    _register_viz(subparsers)


# ----------------------------------------------------------------------------- zoo

def _group(subparsers, name: str, help: str, commands: str):
    """A command group ``visrep NAME {COMMANDS}`` (its help when called alone): the subparsers to fill."""
    group = subparsers.add_parser(name, help=help)
    group.set_defaults(_parser=group)
    return group.add_subparsers(dest=f"{name}_command", metavar="{%s}" % commands)


def _register_zoo(subparsers):
    sub = _group(subparsers, "zoo", "list backbones, summarise one", "list,summary")

    p = sub.add_parser("list", help="registered backbones (PATTERN: glob; 'timm:vit*' / 'tv:res*' list a library)")
    p.add_argument("pattern", nargs="?", default=None)
    p.add_argument("--source", choices=["visrep", "timm", "tv"], default=None)
    p.add_argument("-v", "--verbose", action="store_true", help="also print source, target and paper")
    p.set_defaults(func=_zoo_list)

    p = sub.add_parser("summary", help="parameters, MACs, per-layer shapes and memory of a backbone")
    p.add_argument("name")
    p.add_argument("--input-size", type=int, nargs=3, metavar=("C", "H", "W"), default=None,
                   help="default: the model's data config (3 224 224 for ImageNet models)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--small-input", action="store_true")
    p.add_argument("--depth", type=int, default=2, help="module depth of the layer table (-1: leaves)")
    p.add_argument("--optimizer", default="adamw", choices=["sgd", "momentum", "adam", "adamw"])
    p.add_argument("--max-rows", type=int, default=None)
    p.add_argument("--receptive-field", action="store_true",
                   help="add each feature stage's receptive field and stride (measured: a CPU forward + backward)")
    p.set_defaults(func=_zoo_summary)


def _zoo_list(args) -> int:
    from .registry import get_backbone_entry, list_backbones
    names = list_backbones(args.pattern, source=args.source)
    for n in names:
        if args.verbose and not n.startswith(("timm:", "tv:")):
            e = get_backbone_entry(n)
            extra = f"  [{e.paper}]" if e.paper else ""
            print(f"{n:<32} {e.source + ':' + (e.target or n):<40} {e.description}{extra}")
        else:
            print(n)
    if not names:
        print(f"no backbone matches {args.pattern!r}", file=sys.stderr)
        return 1
    return 0


def _zoo_summary(args) -> int:
    import torch

    from .registry import create_backbone
    from .summary import summarize
    with torch.device("meta"):
        model = create_backbone(args.name, num_classes=args.num_classes, small_input=args.small_input)
    size = tuple(args.input_size) if args.input_size else tuple(model.data_config["input_size"])
    s = summarize(model, size, batch_size=args.batch_size, depth=args.depth, optimizer=args.optimizer)
    s.name = args.name
    if args.receptive_field:
        from .receptive_field import receptive_fields
        s.receptive_fields = receptive_fields(
            create_backbone(args.name, small_input=args.small_input, features_only=True), size)
    print(s.to_text(args.max_rows))
    return 0


# ----------------------------------------------------------------------------- viz

def _model_args(p: argparse.ArgumentParser, image_required: bool = False):
    p.add_argument("name", help="zoo backbone name")
    p.add_argument("--image", required=image_required, default=None,
                   help=None if image_required else "default: a synthetic test pattern")
    p.add_argument("--checkpoint", default=None, help="local .safetensors state dict (strict)")
    p.add_argument("--pretrained", action="store_true", help="weights through timm/torchvision")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--small-input", action="store_true")
    p.add_argument("--out", default=None, help="PNG path (default: NAME_KIND.png)")


# the keys of ``viz.CAM_METHODS``, spelled out so that building the parser imports no torch (a test
# keeps the two lists equal); a wrong name is refused by ``viz.cam_method`` in one line
CAM_METHOD_NAMES = ("gradcam", "gradcam++", "xgradcam", "hirescam", "gradcamelementwise", "layercam", "eigencam",
                    "eigengradcam", "kpcacam", "scorecam", "ablationcam")


def _register_viz(subparsers):
    sub = _group(subparsers, "viz", "Grad-CAM, feature maps, ViT attention as PNG", "gradcam,features,attention")

    p = sub.add_parser("gradcam", help="Grad-CAM (or another CAM method) heatmap of a classifier for an image")
    _model_args(p, image_required=True)
    p.add_argument("--target-class", type=int, default=None, help="default: the predicted class")
    p.add_argument("--layer", default=None, help="module name (default: the last feature stage)")
    p.add_argument("--method", default="gradcam", metavar="METHOD",
                   help="CAM method of the grad-cam package: " + ", ".join(CAM_METHOD_NAMES) + " (default: gradcam; "
                        "scorecam and ablationcam run one forward pass per channel of the layer)")
    p.set_defaults(func=_viz_gradcam)

    p = sub.add_parser("features", help="grid of a layer's feature maps")
    _model_args(p)
    p.add_argument("--layer", default=None, help="module name (default: the middle feature stage)")
    p.add_argument("--max-channels", type=int, default=32)
    p.set_defaults(func=_viz_features)

    p = sub.add_parser("attention", help="ViT attention maps (rollout and last-block heads)")
    _model_args(p)
    p.add_argument("--max-heads", type=int, default=6)
    p.set_defaults(func=_viz_attention)


def _build(args):
    from .registry import create_backbone
    model = create_backbone(args.name, pretrained=args.pretrained, num_classes=args.num_classes,
                            checkpoint=args.checkpoint, small_input=args.small_input)
    if not (args.pretrained or args.checkpoint):
        print(f"note: {args.name} has random weights (pass --checkpoint or --pretrained)", file=sys.stderr)
    return model


def _visualise(args, suffix: str, draw) -> int:
    """Build the model, prepare the input image and print the path of the figure ``draw(model, x, display,
    out)`` wrote (``--out``, default ``NAME_SUFFIX.png``)."""
    from .viz import prepare_input
    model = _build(args)
    x, disp = prepare_input(model, args.image)
    print(draw(model, x, disp, args.out or f"{args.name.replace(':', '_')}_{suffix}.png"))
    return 0


def _viz_gradcam(args) -> int:
    from .viz import cam_method, save_gradcam
    method = cam_method(args.method)  # before building (and maybe downloading) the model
    return _visualise(args, method, lambda model, x, disp, out: save_gradcam(model, x, disp, out, args.target_class,
                                                                             args.layer, method=method))


def _viz_features(args) -> int:
    from .viz import save_feature_grid
    return _visualise(args, "features", lambda model, x, disp, out: save_feature_grid(model, x, out, args.layer,
                                                                                     args.max_channels))


def _viz_attention(args) -> int:
    from .viz import save_attention
    return _visualise(args, "attention", lambda model, x, disp, out: save_attention(model, x, disp, out,
                                                                                   args.max_heads))
