"""``visrep push RUN_DIR USER/REPO``: publish a run's model on the Hugging Face Hub in one commit."""
from __future__ import annotations

import sys


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "push", help="push a run's model to the Hugging Face Hub",
        description="Upload model.safetensors, config.json, a README.md model card (and a transformers "
                    "model's config and tokenizer, hf/) in one commit. "
                    "The token comes from HF_TOKEN or `hf auth login` (never from the command line).")
    p.add_argument("run_dir", help="a run directory (RUN_DIR) or an exported model (RUN_DIR/models/STAGE)")
    p.add_argument("repo_id", help="USER/REPO or ORG/REPO")
    p.add_argument("--stage", default=None, help="stage to push (default: the run's last finished stage)")
    p.add_argument("--private", action="store_true")
    p.add_argument("--message", default=None, help="commit message")
    p.add_argument("--export-only", metavar="DIR", default=None, help="write the files to DIR; send nothing")
    p.set_defaults(func=_run)


def _run(args) -> int:
    from visrep.launch.hub import HubError, export_for_hub, push_to_hub

    try:
        if args.export_only:
            out = export_for_hub(args.run_dir, args.export_only, repo_id=args.repo_id, stage=args.stage)
            print(f"wrote {out}")
            return 0
        info = push_to_hub(args.run_dir, args.repo_id, private=args.private, stage=args.stage,
                           commit_message=args.message)
    except (HubError, FileNotFoundError, ValueError) as e:
        print(f"visrep push: {e}", file=sys.stderr)
        return 1
    print(f"pushed {args.run_dir} to {args.repo_id}: {info.commit_url}")
    return 0
