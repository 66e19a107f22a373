"""``make demo`` wall time, this checkout vs an earlier commit, on the same machine in one run.

The earlier commit is checked out into a temporary git worktree and its ``recipes/distill.py`` run with
the same interpreter and packages as this checkout's (``PYTHONPATH`` points at the worktree, so its own
``visrep`` is imported); then this checkout's. Each is the command ``make demo`` runs (``accelerate
launch recipes/distill.py`` at the recipe's default preset), in a fresh output directory. Rounds
alternate the two (``--rounds``); the table gives each one's wall times, the median and the ratio.

    python benchmarks/demo_time.py                 # vs 8bc1681, the commit before issue 14's work
    python benchmarks/demo_time.py --before HEAD~3 --rounds 2
    python benchmarks/demo_time.py --after HEAD    # a commit for "now" too, not the working tree
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_demo(tree: Path, out: Path) -> tuple[float, dict]:
    env = dict(os.environ, PYTHONPATH=str(tree))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "recipes/distill.py", "--output-dir", str(out),
           "--run.progress", "False"]
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        sys.exit(f"demo in {tree} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return wall, json.loads((out / "results.json").read_text())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", default="8bc1681", help="the earlier commit (default: before issue 14's work)")
    ap.add_argument("--after", default=None, help="a commit for 'now' (default: this working tree)")
    ap.add_argument("--rounds", type=int, default=1)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="visrep-demo-") as tmp:
        old, new = Path(tmp) / "before", ROOT
        trees = [(old, args.before)]
        if args.after:
            new = Path(tmp) / "after"
            trees.append((new, args.after))
        for tree, commit in trees:
            subprocess.run(["git", "worktree", "add", "--detach", str(tree), commit], cwd=ROOT, check=True,
                           capture_output=True)
        try:
            walls: dict[str, list[float]] = {"before": [], "now": []}
            res = {}
            for r in range(args.rounds):
                for key, tree in (("before", old), ("now", new)):
                    wall, res[key] = run_demo(tree, Path(tmp) / f"{key}-{r}")
                    walls[key].append(wall)
                    print(f"round {r + 1}: {key:<7}{wall:8.1f} s  teacher {res[key]['teacher_acc']:.4f} scratch "
                          f"{res[key]['student_scratch_acc']:.4f} KD {res[key]['student_kd_acc']:.4f}", flush=True)
        finally:
            for tree, _ in trees:
                subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, capture_output=True)
    b, n = statistics.median(walls["before"]), statistics.median(walls["now"])
    print(f"\n{'make demo':<28}{'median wall s':>14}")
    print(f"{'before (' + args.before + ')':<28}{b:>14.1f}")
    print(f"{'now (' + (args.after or 'working tree') + ')':<28}{n:>14.1f}")
    print(f"ratio now / before: {n / b:.3f}  (target <= 0.6)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
