"""Digits -> Digits-M: target test accuracy of source-only and each alignment method over seeds.

    python benchmarks/adapt_bench.py                               # 8 methods x 3 seeds, the default preset
    python benchmarks/adapt_bench.py --methods source_only dann --seeds 0 1 2 3 4
    python benchmarks/adapt_bench.py --methods source_only cdan_e mcc mdd
    python benchmarks/adapt_bench.py --processes 2 -- --schedule.epochs 20   # args after -- go to the recipe

Each (method, seed) is one run of ``recipes/adapt.py`` in its own run dir under ``--output-dir``; a run
that already has ``results.json`` is reused (and an interrupted one resumed), so the benchmark can be
stopped and continued. Reported per method, mean +- std (sample std) over seeds:
  target acc   -- of the model selected on SOURCE validation accuracy (the honest number);
  vs source    -- difference of the means to source-only, and on how many seeds the method won;
  s/epoch      -- training time per epoch (mean over epochs and seeds);
  oracle       -- best per-epoch target test accuracy: selected WITH target test labels, shown only to
                  say how much selection costs; not a valid result.
A method whose mean does not exceed source-only's is reported as such.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from timing import mean_std, recipe_results

ROOT = Path(__file__).resolve().parent.parent
METHODS = ("source_only", "dann", "mmd", "coral", "cdan", "cdan_e", "mcc", "mdd")


def run_one(method: str, seed: int, out: Path, processes: int, extra: list[str]) -> dict:
    return recipe_results("adapt", ["--method", method, "--seed", str(seed), *extra], out,
                          f"adapt_bench {method} seed {seed}", processes)


def table(rows: dict[str, list[dict]]) -> str:
    base = [r["target_acc"] for r in rows.get("source_only", [])]
    lines = [f"{'method':<12}{'target acc':>18}{'vs source':>12}{'wins':>7}{'source val':>18}{'s/epoch':>9}"
             f"{'oracle*':>18}", "-" * 94]
    verdicts = []
    for method, rs in rows.items():
        t = [r["target_acc"] for r in rs]
        v = [r["source_val_acc"] for r in rs]
        o = [r["oracle_target_acc"] for r in rs]
        sec = [r["time_per_epoch_s"] for r in rs if r.get("time_per_epoch_s")]
        tm, ts = mean_std(t)
        vm, vs = mean_std(v)
        om, os_ = mean_std(o)
        if method != "source_only" and base:
            gain = tm - statistics.fmean(base)
            wins = sum(a > b for a, b in zip(t, base))
            delta, won = f"{gain:+.4f}", f"{wins}/{len(t)}"
            if gain <= 0:
                verdicts.append(f"{method} does NOT beat source-only here (mean {gain:+.4f}, wins {won}).")
            else:
                verdicts.append(f"{method} beats source-only by {gain:+.4f} on average (wins {won}).")
        else:
            delta, won = "-", "-"
        lines.append(f"{method:<12}{tm:>10.4f} +- {ts:.4f}{delta:>12}{won:>7}{vm:>10.4f} +- {vs:.4f}"
                     f"{statistics.fmean(sec) if sec else float('nan'):>9.1f}{om:>10.4f} +- {os_:.4f}")
    lines.append("* oracle: the best epoch chosen with target TEST labels -- not a valid result, shown to "
                 "measure what honest selection on the source val split costs.")
    return "\n".join(lines + verdicts)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--processes", type=int, default=1)
    ap.add_argument("--output-dir", default="runs/adapt_bench")
    ap.add_argument("recipe_args", nargs="*", help="after --: passed to recipes/adapt.py")
    args = ap.parse_args(argv)
    out = Path(args.output_dir)
    methods = ["source_only"] + [m for m in args.methods if m != "source_only"] if "source_only" in args.methods \
        else args.methods
    rows: dict[str, list[dict]] = {}
    for seed in args.seeds:  # seed-major: a partial benchmark already compares methods on equal seeds
        for method in methods:
            rows.setdefault(method, []).append(
                run_one(method, seed, out / f"{method}_seed{seed}", args.processes, args.recipe_args))
    text = table(rows)
    print(f"\nDigits -> Digits-M, {len(args.seeds)} seeds ({', '.join(map(str, args.seeds))}), "
          f"{args.processes} process(es)\n" + text)
    summary = {m: {"target_acc": [r["target_acc"] for r in rs], "source_val_acc": [r["source_val_acc"] for r in rs],
                   "oracle_target_acc": [r["oracle_target_acc"] for r in rs],
                   "time_per_epoch_s": [r.get("time_per_epoch_s") for r in rs]} for m, rs in rows.items()}
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "summary.txt").write_text(text + "\n")
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
