"""Lifelong-editing benchmark: 1,000 sequential edits, each method in the edit memory and in the weights (with
and without null-space protection), on several world seeds, with the headline metrics at 100, 250, 500 and
1,000 edits.

    python -m bench.lifelong                                   # default world, seeds 0,1,2, 1,000 edits
    python -m bench.lifelong --seeds 0 --edits 100,250 --methods kdpo,ft-m --protections memory,null-space
    python -m bench.lifelong --edits-file ../shared/data/counterfact-edit-2k.json --seeds 0 --edits 100,250,500,1000
    python -m bench.lifelong --edits-file ../shared/data/zsre_mend-500.json --seeds 0 --edits 100,250,500
    python -m bench.lifelong --world-set preset=large --seeds 0 --edits 1000,2500,5000,10000 --methods kdpo \
        --protections memory --name large                 # 10,000 edits on the large world (CPU hours)

Each (seed, method, protection) runs in a process of its own (``bench.measure``; ``--jobs`` at a time): one
run of max(N) edits, every first-N prefix scored right after edit N. A finished run's summary is kept next to its
result, and an unfinished run saves itself every ``--checkpoint-every`` edits, so re-running the same command
resumes an interrupted benchmark, mid-run included. Writes ``bench/results/lifelong-NAME/report.{md,json}`` and
``curves.png``; the bar of the lifelong issue is checked against KDPO with default settings.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from transformers import AutoTokenizer

from bench.compare import DASK_ADDRESS_HELP, METHODS, parse_counts, prepare_world, run_and_print, world_summary
from bench.measure import Job, run_jobs, threads_per_job
from kdpo.cli import UsageError
from kdpo.config import split_setting
from kdpo.editing import SCHEDULE, make_config
from kdpo.evaluation import PROTOCOL
from kdpo.tables import TABLE, format_table
from kdpo.world import build_world, world_config

PROTECTIONS = ("memory", "null-space", "none")
BAR = {"edit_success": 0.99, "generalization": 0.90, "locality": 0.97, "retention": 0.99, "edit_success_exact": 0.95}
FLUENCY_TOLERANCE = 0.02  # relative to the pre-edit model
SECONDS_PER_EDIT = 0.1  # CPU seconds per KDPO edit with default settings on the default world
DEFAULT_PROTECTION = make_config("kdpo").protection


def headline(summary: dict) -> dict:
    """The final scores (``TABLE``: teacher-forced and exact), retention, immediate ES, CPU s/edit and weight drift
    of one summary."""
    final = summary["final"]
    return {
        **{metric: final.get(metric) for metric in TABLE}, "retention": summary["retention"],
        "fluency_before": summary["fluency_before"], "immediate_edit_success": summary["immediate"]["edit_success"],
        "cpu_seconds_per_edit": summary.get("cpu_seconds_per_edit"),  # absent in results of older code
        "weight_drift": summary.get("weight_drift", {}),
    }


def multi_token_success(result_path: Path, tokenizer) -> dict:
    """Final edit success of the edits whose target is 2+ tokens, and how many there are (from the
    method's full result JSON: each request's answers entry and final scores)."""
    from kdpo.modeling import answer_token_ids

    result = json.loads(result_path.read_text())
    scores = [final["edit_success"] for final, answer in zip(result["final"], result["answers"])
              if len(answer_token_ids(tokenizer, answer["target_new"])) >= 2]
    return {"edits": len(scores), "edit_success": statistics.fmean(scores) if scores else None}


def aggregate(values: list[float | None]) -> dict:
    """Mean and sample standard deviation over seeds (None where a value is missing)."""
    present = [v for v in values if v is not None]
    if not present:
        return {"mean": None, "sd": None}
    return {"mean": statistics.fmean(present), "sd": statistics.stdev(present) if len(present) > 1 else 0.0}


def summarize_variant(runs: list[dict], counts: tuple[int, ...]) -> dict:
    """Across seeds, for one (method, protection): each headline metric at each edit count."""
    by_count = {}
    for position, count in enumerate(counts):
        figures = [headline(run["by_count"][position]) for run in runs]
        by_count[count] = {
            name: aggregate([f[name] for f in figures])
            for name in (*TABLE, "retention", "fluency_before", "immediate_edit_success", "cpu_seconds_per_edit")
        }
    by_count[counts[-1]]["multi_token_edit_success"] = aggregate([run["multi_token"]["edit_success"] for run in runs])
    return by_count


def bar_checks(variants: dict, counts: tuple[int, ...]) -> list[dict]:
    """The lifelong bar against KDPO with default settings at the largest edit count."""
    kdpo = variants.get(f"kdpo/{DEFAULT_PROTECTION}")
    if kdpo is None:
        return []
    last = kdpo[counts[-1]]
    checks = [{"target": f"{name} >= {bound} after {counts[-1]} edits", "measured": last[name]["mean"],
               "met": last[name]["mean"] is not None and last[name]["mean"] >= bound} for name, bound in BAR.items()]
    before, after = last["fluency_before"]["mean"], last["fluency"]["mean"]
    if before and after is not None:
        change = abs(after - before) / before
        checks.append({"target": f"fluency within {FLUENCY_TOLERANCE:.0%} of the pre-edit model",
                       "measured": change, "met": change <= FLUENCY_TOLERANCE})
    seconds = last["cpu_seconds_per_edit"]["mean"]
    if seconds is not None:  # the speed target, with its ratio to unprotected FT-M of the same benchmark run
        ft_m = variants.get("ft-m/none", {}).get(counts[-1], {}).get("cpu_seconds_per_edit", {}).get("mean")
        checks.append({"target": f"cpu_seconds_per_edit <= {SECONDS_PER_EDIT}", "measured": seconds,
                       "met": seconds <= SECONDS_PER_EDIT, "ratio_to_unprotected_ft_m": seconds / ft_m if ft_m else None})
    return checks


def plot_curves(variants: dict, counts: tuple[int, ...], path: Path) -> None:
    """One panel per headline metric over the edit count, a line per (method, protection), mean over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = ("edit_success", "generalization", "locality", "retention")
    figure, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 3.6), sharey=True)
    for axis, metric in zip(axes, metrics):
        for name, by_count in sorted(variants.items()):
            means = [by_count[c][metric]["mean"] for c in counts]
            style = {"memory": "-", "null-space": "--"}.get(name.split("/")[1], ":")
            axis.plot(counts, [m if m is not None else float("nan") for m in means], style, marker="o", label=name)
        axis.set_title(metric.replace("_", " "))
        axis.set_xlabel("sequential edits")
        axis.set_ylim(0, 1.02)
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="lower left")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def markdown(report: dict) -> str:
    counts = report["counts"]
    lines = [f"# Lifelong editing: {report['name']}", "",
             f"World seeds {report['seeds']}; {counts[-1]} sequential edits; schedule: {report['schedule']}", ""]
    header = ["method", "protection", "ES now", "ES", "ES 2+ tokens", "GEN", "LOC", "RET", "fluency", "ES exact",
              "GEN exact", "LOC exact", "CPU s/edit"]
    rows = []
    for name, by_count in sorted(report["variants"].items()):
        method, protection = name.split("/")
        last = by_count[counts[-1]]
        rows.append([method, protection] + [
            _cell(last[m]) for m in ("immediate_edit_success", "edit_success", "multi_token_edit_success",
                                     "generalization", "locality", "retention", "fluency", "edit_success_exact",
                                     "generalization_exact", "locality_exact", "cpu_seconds_per_edit")])
    lines += [f"## After {counts[-1]} edits (mean ± sd over seeds)", "", format_table(header, rows, markdown=True), ""]
    curve_rows = []
    for name, by_count in sorted(report["variants"].items()):
        for count in counts:
            c = by_count[count]
            curve_rows.append([name, count] + [_cell(c[m]) for m in ("edit_success", "generalization", "locality",
                                                                       "retention")])
    lines += ["## Curve", "", format_table(["variant", "edits", "ES", "GEN", "LOC", "RET"], curve_rows, markdown=True), "",
              "![curves](curves.png)", ""]
    if report["bar"]:
        lines += [f"## The bar (KDPO, default settings: {DEFAULT_PROTECTION})", "", format_table(
            ["target", "measured", "met"],
            [[c["target"], _measured(c), "yes" if c["met"] else "NO"] for c in report["bar"]], markdown=True), ""]
    lines += ["Fluency: weighted 2/3-gram entropy of greedy generations; before editing: "
              + ", ".join(f"seed {w['seed']}: {w['fluency_before']:.3f}" for w in report["worlds"]), ""]
    return "\n".join(lines)


def _measured(check: dict) -> str:
    text = f"{check['measured']:.3f}" if check["measured"] is not None else "-"
    if check.get("ratio_to_unprotected_ft_m"):
        text += f" ({check['ratio_to_unprotected_ft_m']:.2f}x unprotected FT-M)"
    return text


def _cell(stat: dict) -> str:
    if stat["mean"] is None:
        return "-"
    return f"{stat['mean']:.3f}" + (f" ± {stat['sd']:.3f}" if stat["sd"] else "")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.lifelong", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--edits-file", help="build the worlds from this edit file (default: the shipped fact table)")
    source.add_argument("--world", help="an already built world directory, used as it is (instead of --seeds)")
    parser.add_argument("--edits", default="100,250,500,1000", help="edit counts of the curve (default 100,250,500,1000)")
    parser.add_argument("--seeds", default="0,1,2", help="world seeds (default 0,1,2)")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--protections", default=",".join(PROTECTIONS))
    parser.add_argument("--world-set", action="append", metavar="KEY=VALUE", help="a world build setting")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="an editor setting, for every variant")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    parser.add_argument("--name", help="report name (default: the edit file's stem, or default-world)")
    parser.add_argument("--out", help="report folder (default: bench/results/lifelong-NAME)")
    parser.add_argument("--checkpoint-every", type=int, default=250, metavar="N",
                        help="save each run every N edits; the same command continues an interrupted run from its "
                             "last save (default 250; 0: never)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time: worker processes of the local Dask "
                        "cluster, each job with cores/JOBS torch threads (default 1)")
    parser.add_argument("--dask-address", help=DASK_ADDRESS_HELP)
    parser.add_argument("--quiet", action="store_true")
    return parser


def run(args: argparse.Namespace) -> dict:
    counts = parse_counts(args.edits)
    if args.checkpoint_every < 0:
        raise UsageError(f"--checkpoint-every expects 0 or a positive number of edits, got {args.checkpoint_every}")
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()] if not args.world else [None]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    protections = [p.strip() for p in args.protections.split(",") if p.strip()]
    overrides = dict(split_setting(item) for item in args.set or [])
    for method in methods:
        for protection in protections:
            make_config(method, overrides=overrides | {"protection": protection})  # fail before any work
    world_settings = dict(split_setting(item, "--world-set") for item in args.world_set or [])
    name = args.name or next(Path(p).stem for p in (args.edits_file, args.world, "default-world") if p)
    out = Path(args.out or Path("bench/results") / f"lifelong-{name}")
    out.mkdir(parents=True, exist_ok=True)
    worlds, jobs = [], []
    for seed in seeds:
        if args.world:
            world = prepare_world(args.world, quiet=args.quiet)
            seed = world.info["config"]["seed"]
        else:
            config = world_config(world_settings | {"seed": str(seed)})
            world = build_world(config, from_file=args.edits_file, progress=not args.quiet)
        if world.info["edits"] < counts[-1]:
            raise UsageError(f"{counts[-1]} edits asked, but the world (seed {seed}) has {world.info['edits']} requests")
        worlds.append((seed, world))
        for method in methods:
            for protection in protections:
                job_out = out / f"seed{seed}-{protection}"
                job_out.mkdir(exist_ok=True)
                jobs.append((seed, f"{method}/{protection}", Job(
                    str(world.path), method, counts, overrides | {"protection": protection}, args.device,
                    out=str(job_out), progress=not args.quiet and args.jobs == 1,
                    threads=threads_per_job(args.jobs), checkpoint_every=args.checkpoint_every)))
    results = run_jobs([job for _, _, job in jobs], args.jobs, args.quiet, args.dask_address)
    runs: dict[str, list[dict]] = {}
    fluency_before = {}
    tokenizers = {str(world.path): AutoTokenizer.from_pretrained(world.path) for _, world in worlds}
    for (seed, variant, job), result in zip(jobs, results):
        result["multi_token"] = multi_token_success(Path(job.out) / f"{job.method}.json", tokenizers[job.world])
        runs.setdefault(variant, []).append(result)
        fluency_before[seed] = result["by_count"][0]["fluency_before"]
    worlds = [world_summary(world) | {"seed": seed, "fluency_before": fluency_before[seed]} for seed, world in worlds]
    variants = {name: summarize_variant(variant_runs, counts) for name, variant_runs in runs.items()}
    report = {
        "name": name, "edits_file": args.edits_file, "counts": list(counts), "seeds": [w["seed"] for w in worlds],
        "worlds": worlds,
        "overrides": overrides, "schedule": SCHEDULE + "; plus every first-N prefix scored right after edit N",
        "protocol": PROTOCOL, "variants": variants, "bar": bar_checks(variants, counts),
        "configs": {name: variant_runs[0]["config"] for name, variant_runs in runs.items()},
        "runs": {name: [{"by_count": r["by_count"], "memory": r["memory"], "multi_token": r["multi_token"]}
                        for r in variant_runs]
                 for name, variant_runs in runs.items()},
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    plot_curves(variants, counts, out / "curves.png")
    (out / "report.md").write_text(markdown(report))
    return report


def main(argv: list[str] | None = None) -> int:
    return run_and_print("bench.lifelong", build_parser(), run, markdown, argv)


if __name__ == "__main__":
    sys.exit(main())
