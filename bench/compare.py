"""Benchmark: KDPO, DPO, FT-L and FT-M with N sequential edits on a world that learned an edit file's facts.

    python -m bench.compare --edits-file ../shared/data/zsre_mend-500.json --edits 25,50,100,200,500
    python -m bench.compare --edits-file ../shared/data/counterfact-edit-2k.json --edits 25,50,100,200,500
    python -m bench.compare --edits 25,50,100,200      # the default world (kdpo world build), no edit file
    python -m bench.compare --edits 30 --methods kdpo,ft-m --set protection=none --world-set seed=1

Builds (or reuses from the cache) the world that learned the file's true facts (``kdpo world build --from``),
runs each method in a process of its own (so the peak memory is that method's alone) for max(N) edits,
evaluating after every N, and writes ``bench/results/<name>/report.{md,json}`` (plus each method's full
per-edit result). Each method is one MLflow run (experiment ``kdpo-benchmark``, under one parent run per
benchmark) with the report as an artifact.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from bench.measure import BUDGET_FORMULA, PEAK_FORMULA, Job, run_jobs, threads_per_job
from kdpo.cli import UsageError
from kdpo.config import ConfigError, flat_settings, split_setting
from kdpo.editing import SCHEDULE, make_config
from kdpo.evaluation import PROTOCOL
from kdpo.loaders import EditDataError
from kdpo.modeling import ModelLoadError
from kdpo.world import World, WorldConfig, build_world, world_config
from kdpo.tables import format_table
from kdpo.world.build import table_sources, world_key

METHODS = ("kdpo", "dpo", "ft-l", "ft-m")
EXPERIMENT = "kdpo-benchmark"
DASK_ADDRESS_HELP = ("a running Dask scheduler (tcp://HOST:8786) whose workers run the jobs instead of a local cluster "
                     "of --jobs workers; start them with --nthreads 1, where they see the world and --out paths")
QUALITY_TARGETS = {"edit_success": 0.95, "generalization": 0.80, "locality": 0.90, "retention": 0.85}
SPEED_TARGET = 0.1  # seconds per KDPO edit on the default world
MEMORY_TARGET = 1.5  # peak over (model + trained-delta state)


def parse_counts(text: str) -> tuple[int, ...]:
    """``"100,500"`` -> ``(100, 500)``: sorted, distinct, positive."""
    try:
        counts = sorted({int(item) for item in text.split(",") if item.strip()})
    except ValueError:
        raise UsageError(f"--edits expects comma-separated edit counts such as 100,500, got {text!r}") from None
    if not counts or counts[0] < 1:
        raise UsageError(f"--edits expects positive edit counts, got {text!r}")
    return tuple(counts)


def prepare_world(world: str | None = None, edits_file: str | None = None, world_set: list[str] | None = None,
                  quiet: bool = False) -> World:
    """``world`` (a directory) as it is, else the world that learned ``edits_file``'s true facts, else the
    default world (both built with the ``world_set`` KEY=VALUE settings, or reused from the cache)."""
    if world:
        info_path = Path(world) / "world.json"
        if not info_path.exists():
            raise UsageError(f"--world {world} is not a built world (it has no world.json)")
        return World(Path(world), json.loads(info_path.read_text()) | {"cached": True})
    config = world_config(dict(split_setting(item, "--world-set") for item in world_set or []))
    return build_world(config, from_file=edits_file, progress=not quiet)


def world_summary(world: World) -> dict:
    """What the report says about the world, including whether its build reached the recall bar."""
    info = world.info
    trained = {kind: value for kind, value in info["recall"].items() if not kind.startswith("held_out")}
    return {
        "path": str(world.path), "source": info["source"], "parameters": info["parameters"],
        "vocab_size": info["vocab_size"], "facts": info["facts"], "edit_requests": info["edits"],
        "recall": info["recall"], "recall_target": info["config"]["recall_target"],
        "recall_reached": min(trained.values()) >= info["config"]["recall_target"] if trained else None,
        "epochs": info["epochs"], "build_seconds": info["seconds"], "cached": info.get("cached", False),
    }


def git_version() -> str | None:
    """``git describe --always --dirty`` of the working tree, or None outside a git checkout."""
    try:
        done = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True, timeout=10)
    except OSError:
        return None
    return done.stdout.strip() or None


def mean_of_four(summary: dict) -> float:
    """Mean of final edit success, generalization, locality and retention (None counts as 0)."""
    final = summary["final"]
    values = [final["edit_success"], final["generalization"], final["locality"], summary["retention"]]
    return sum(v or 0.0 for v in values) / 4


def eval_curve(row: dict) -> dict:
    """Wall and CPU seconds of the final evaluation at each edit count, per request, and least-squares lines
    (``slope_seconds_per_request``, ``cpu_slope_seconds_per_request``, with their intercepts)."""
    curve = {"points": [
        {"edits": s["edits"], "seconds": s["final_eval_seconds"], "seconds_per_request": s["final_eval_seconds"] / s["edits"],
         "cpu_seconds": s.get("final_eval_cpu_seconds")} for s in row["by_count"]
    ]}
    for prefix, key in (("", "seconds"), ("cpu_", "cpu_seconds")):
        points = [(p["edits"], p[key]) for p in curve["points"]]
        if len(points) >= 2 and all(t is not None for _, t in points):
            slope, intercept = statistics.linear_regression(*zip(*points))
            curve |= {f"{prefix}slope_seconds_per_request": slope, f"{prefix}intercept_seconds": intercept}
    return curve


def speed_summary(rows: list[dict]) -> dict:
    """Seconds per edit of each method at the largest count, KDPO / FT-M, and the evaluation-cost curves."""
    per_edit = {row["method"]: row["by_count"][-1]["seconds_per_edit"] for row in rows}
    speed = {"seconds_per_edit": per_edit, "eval_curves": {row["method"]: eval_curve(row) for row in rows}}
    if "kdpo" in per_edit and "ft-m" in per_edit:
        speed["kdpo_over_ft_m"] = per_edit["kdpo"] / per_edit["ft-m"]
    return speed


def target_checks(rows: list[dict], default_world: bool) -> list[dict]:
    """KDPO's measured figures at the largest count against the project's targets."""
    kdpo = next((row for row in rows if row["method"] == "kdpo"), None)
    if kdpo is None:
        return []
    last = kdpo["by_count"][-1]
    measured = {"edit_success": last["final"]["edit_success"], "generalization": last["final"]["generalization"],
                "locality": last["final"]["locality"], "retention": last["retention"]}
    checks = [{"target": f"{name} (final) >= {bound}", "measured": measured[name],
               "met": measured[name] is not None and measured[name] >= bound} for name, bound in QUALITY_TARGETS.items()]
    if default_world:
        checks.append({"target": f"seconds per KDPO edit on the default world <= {SPEED_TARGET} (wall clock)",
                       "measured": last["seconds_per_edit"], "met": last["seconds_per_edit"] <= SPEED_TARGET})
        if kdpo.get("cpu_seconds_per_edit") is not None:
            checks.append({"target": f"CPU seconds per KDPO edit on the default world <= {SPEED_TARGET}",
                           "measured": kdpo["cpu_seconds_per_edit"], "met": kdpo["cpu_seconds_per_edit"] <= SPEED_TARGET})
    ratio = kdpo["memory"].get("cuda_ratio", kdpo["memory"].get("ratio"))
    if ratio is not None:
        checks.append({"target": f"peak memory / (model + trained-delta state) <= {MEMORY_TARGET}",
                       "measured": ratio, "met": ratio <= MEMORY_TARGET})
    return checks


def build_report(name: str, edits_file: str | None, world: World, counts: tuple[int, ...], rows: list[dict],
                 device: str, dtype: str) -> dict:
    """The benchmark's JSON report: world, settings, per-method results, speed, memory, target checks."""
    for row in rows:
        for summary in row["by_count"]:
            summary["mean_of_four"] = mean_of_four(summary)
    return {
        "name": name, "edits_file": edits_file, "world": world_summary(world), "counts": list(counts),
        "device": device, "dtype": dtype,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "torch_threads": rows[0]["torch_threads"]},
        "git": git_version(), "kdpo_source": sorted({row["kdpo_source"] for row in rows}),
        "schedule": SCHEDULE, "protocol": PROTOCOL,
        "memory_formula": {"peak": PEAK_FORMULA, "budget": BUDGET_FORMULA, "ratio": "peak / budget"},
        "edits": counts[-1], "rows": rows, "speed": speed_summary(rows),  # `kdpo report` reads edits and rows
        "targets": target_checks(rows, default_world=world.info["key"] == world_key(table_sources(WorldConfig()), WorldConfig())),
    }


def quality_table(report: dict) -> str:
    with_portability = any(s["final"]["portability"] is not None for row in report["rows"] for s in row["by_count"])
    headers = ["method", "edits", "ES imm.", "ES final", "GEN final", "LOC final", *(["PORT final"] * with_portability),
               "RET final", "mean of 4", "fluency final", "s/edit"]
    rows = []
    for count in report["counts"]:
        for row in report["rows"]:
            s = next(s for s in row["by_count"] if s["edits"] == count)
            final = s["final"]
            rows.append([row["method"], count, s["immediate"]["edit_success"], final["edit_success"],
                         final["generalization"], final["locality"], *([final["portability"]] * with_portability),
                         s["retention"], s["mean_of_four"], final["fluency"], s["seconds_per_edit"]])
    return format_table(headers, rows)


def speed_tables(report: dict) -> list[str]:
    methods = report["rows"]
    windows = list(methods[0]["edit_seconds_by_window"])
    per_edit = format_table(
        ["method", *(f"s/edit {w}" for w in windows), "CPU s/edit", "steps/edit", "wall s", "load avg (1 min) after"],
        [[r["method"], *r["edit_seconds_by_window"].values(), r.get("cpu_seconds_per_edit"),
          r["by_count"][-1]["steps_per_edit"], r["wall_seconds"], r["load_average"][0]] for r in methods],
    )
    curves = report["speed"]["eval_curves"]
    points = {r["method"]: {p["edits"]: p for p in curves[r["method"]]["points"]} for r in methods}
    names = [r["method"] for r in methods]
    curve = format_table(
        ["edits", *(f"{m} s" for m in names), *(f"{m} CPU s" for m in names), *(f"{m} CPU ms/req" for m in names)],
        [[count, *(points[m][count]["seconds"] for m in names), *(points[m][count]["cpu_seconds"] for m in names),
          *(None if points[m][count]["cpu_seconds"] is None else 1000 * points[m][count]["cpu_seconds"] / count
            for m in names)]
         for count in report["counts"]],
    )
    fits = [f"- {method}: wall {c['slope_seconds_per_request'] * 1000:.2f} ms per request + {c['intercept_seconds']:.2f} s"
            + (f"; CPU {c['cpu_slope_seconds_per_request'] * 1000:.2f} ms per request + {c['cpu_intercept_seconds']:.2f} s"
               if "cpu_slope_seconds_per_request" in c else "")
            for method, c in curves.items() if "slope_seconds_per_request" in c]
    return [per_edit, curve, "\n".join(fits)]


def memory_table(report: dict) -> str:
    cuda = any("cuda_peak_allocated_mb" in r["memory"] for r in report["rows"])
    first = report["counts"][0]
    columns = {"model_mb": "model", "trained_delta_mb": "deltas", "budget_mb": "budget",
               "rss_before_load_mb": "RSS before load", "peak_load_and_probe_mb": "peak load+probe",
               "peak_setup_mb": "peak setup+edit 1", "peak_edits_mb": f"peak edits 2-{first}", "peak_rest_mb": "peak rest",
               "peak_over_baseline_mb": "peak - before load", "ratio": "ratio",
               "setup_over_start_mb": "setup+edit 1 - RSS before", "edits_over_start_mb": f"edits 2-{first} - RSS before"}
    if cuda:
        columns |= {"cuda_peak_load_and_probe_mb": "CUDA peak load+probe", "cuda_peak_setup_mb": "CUDA peak setup+edit 1",
                    "cuda_peak_edits_mb": f"CUDA peak edits 2-{first}", "cuda_peak_rest_mb": "CUDA peak rest",
                    "cuda_peak_allocated_mb": "CUDA peak", "cuda_ratio": "CUDA ratio"}
    return format_table(["method", *columns.values()],
                        [[r["method"], *(r["memory"].get(k) for k in columns)] for r in report["rows"]])


def markdown(report: dict) -> str:
    """The report as markdown: quality, speed, memory and targets, each number with its schedule."""
    world = report["world"]
    recall = ", ".join(f"{kind} {value:.3f}" for kind, value in world["recall"].items())
    fluency_before = report["rows"][0]["by_count"][-1]["fluency_before"]
    speed = report["speed"]
    lines = [
        f"# Benchmark: {report['name']}",
        "",
        f"World: `{world['source']}` -> {world['parameters']:,} parameters, vocabulary {world['vocab_size']:,}, "
        f"facts {world['facts']}, built in {world['build_seconds']} s ({world['epochs']} epochs).",
        f"Recall {recall}; target {world['recall_target']}: "
        f"{'reached' if world['recall_reached'] else '**NOT reached**'}." if world["recall"] else
        "Recall not measured: the model is not a trained world.",
        f"Device {report['device']}, dtype {report['dtype']}, {report['machine']['torch_threads']} torch threads, "
        f"{report['machine']['cpus']} CPUs, torch {report['machine']['torch']}; code {report['git']}, "
        f"kdpo sources {', '.join(report['kdpo_source'])}"
        f"{' (**the methods ran different kdpo sources**)' if len(report['kdpo_source']) > 1 else ''}.",
        "",
        f"Schedule: {report['schedule']}. 'imm.' = immediate, 'final' = after the last of the row's edits; "
        "each row's N-edit result is the first N edits of one run, evaluated right after edit N.",
        "",
        "## Quality",
        "",
        "```",
        quality_table(report),
        "```",
        "",
        f"Fluency before editing: {fluency_before:.3f}. s/edit = the editor's own time per edit (no evaluation).",
        "",
        "## Speed",
        "",
    ]
    if "kdpo_over_ft_m" in speed:
        lines.append(f"KDPO / FT-M seconds per edit (same run, {report['counts'][-1]} edits): "
                     f"{speed['kdpo_over_ft_m']:.2f}.\n")
    per_edit, curve, fits = speed_tables(report)
    lines += ["Editor seconds per edit (wall clock), by edit window; CPU s/edit = CPU time of all threads per edit, "
              "edits 2..N with their immediate evaluation (the machine's other load does not inflate it):",
              "", "```", per_edit, "```", "",
              "Final-evaluation cost at each edit count (all N requests scored once, with fluency):", "",
              "```", curve, "```", "", "Least-squares line through the final-evaluation times:", "", fits, "",
              "## Memory", "", f"MB. peak = {PEAK_FORMULA}; budget = {BUDGET_FORMULA}; ratio = peak / budget. "
              "Phases: loading and the baseline probe; the editor's setup (protection keys from the corpus) with the "
              f"first edit; edits 2-{report['counts'][0]} with their immediate evaluations; the rest. The last two "
              "columns are what a phase's peak adds to the RSS at its start: a second copy of the model for the "
              "reference would add at least 'model'.", "",
              "```", memory_table(report), "```", ""]
    if report["targets"]:
        lines += ["## Targets (KDPO, largest edit count)", "", "```",
                  format_table(["target", "measured", "met"], [[t["target"], t["measured"], t["met"]]
                                                               for t in report["targets"]]), "```", ""]
    lines += ["## Protocol", "", *(f"- {name}: {text}" for name, text in report["protocol"].items())]
    return "\n".join(lines) + "\n"


def count_metrics(summary: dict) -> dict[str, float]:
    """One edit count's figures as flat MLflow metrics: final/*, immediate/* and the scalars."""
    from tasks.tracking import flat_metrics

    scalars = {k: float(v) for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return flat_metrics("final", summary["final"]) | flat_metrics("immediate", summary["immediate"]) | scalars


def log_to_mlflow(report: dict, out: Path, tracking_uri: str | None, artifact_root: str | None) -> dict[str, str]:
    """One run per method (metrics by edit count as steps, memory, the report as artifact) under one parent
    run: the run ``mlflow run`` made, or a new one in experiment ``kdpo-benchmark``. Returns the run ids."""
    import mlflow  # here, not at module level: the measuring processes import this module and need no MLflow

    from tasks.tracking import default_tracking_uri, flat_metrics, step_run

    mlflow.set_tracking_uri(tracking_uri or default_tracking_uri())
    reports = [str(out / "report.md"), str(out / "report.json")]
    tags = {"benchmark": report["name"], "schedule": report["schedule"], "edits_file": str(report["edits_file"]),
            "world": report["world"]["path"], "device": report["device"], "dtype": report["dtype"]}
    parent = os.environ.get("MLFLOW_RUN_ID")  # under `mlflow run`, that run is the parent
    if parent is None:
        if mlflow.get_experiment_by_name(EXPERIMENT) is None:
            from kdpo.artifacts import experiment_artifact_location  # http(s) tracking: the server decides

            location = experiment_artifact_location(mlflow.get_tracking_uri(), artifact_root)
            mlflow.create_experiment(EXPERIMENT, artifact_location=location)
        mlflow.set_experiment(EXPERIMENT)
        with mlflow.start_run(run_name=f"benchmark {report['name']}") as run:
            parent = run.info.run_id
    runs = {"parent": parent}
    with mlflow.start_run(run_id=parent):
        mlflow.set_tags(tags)  # tags, not params: `mlflow run` has already logged its own parameters here
        for path in reports:
            mlflow.log_artifact(path)
    for row in report["rows"]:
        params = flat_settings(row["config"]) | {"method": row["method"], "edits_file": report["edits_file"],
                                  "counts": report["counts"], "device": report["device"], "dtype": report["dtype"]}
        with step_run(row["method"], parent, params) as run:
            mlflow.set_tags(tags | {f"protocol.{name}": text for name, text in report["protocol"].items()})
            for summary in row["by_count"]:
                mlflow.log_metrics(count_metrics(summary), step=summary["edits"])
            mlflow.log_metrics(flat_metrics("memory", row["memory"]) | {"wall_seconds": row["wall_seconds"]})
            for path in [*reports, str(out / f"{row['method']}.json")]:
                mlflow.log_artifact(path)
            runs[row["method"]] = run.info.run_id
    return runs


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--edits-file", help="edit-request file to build the world from (default: the default world)")
    source.add_argument("--world", help="an already built world directory to use as it is")
    parser.add_argument("--edits", default="100,500", help="comma-separated sequential edit counts (default 100,500)")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {', '.join(METHODS)}")
    parser.add_argument("--world-set", action="append", metavar="KEY=VALUE", help="a world build setting")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="an editor setting, for every method")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--name", help="report name (default: the edit file's stem, or default-world)")
    parser.add_argument("--out", help="report folder (default: bench/results/NAME)")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlruns.db)")
    parser.add_argument("--artifact-root", help="where a new kdpo-benchmark experiment keeps artifacts: a URI as given, a local path "
                        "as a file URI (default: the server's store for http(s) tracking, else ./mlartifacts)")
    parser.add_argument("--no-mlflow", action="store_true", help="write the report only")
    parser.add_argument("--jobs", type=int, default=1, help="methods at a time: worker processes of the local Dask "
                        "cluster, each job with cores/JOBS torch threads (default 1)")
    parser.add_argument("--dask-address", help=DASK_ADDRESS_HELP)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def run(args: argparse.Namespace) -> dict:
    """:func:`benchmark` with the command line's options."""
    return benchmark(
        args.edits, args.methods, world=args.world, edits_file=args.edits_file, world_set=args.world_set,
        settings=args.set, device=args.device, dtype=args.dtype, name=args.name, out=args.out,
        tracking_uri=args.tracking_uri, artifact_root=args.artifact_root, log_mlflow=not args.no_mlflow,
        jobs=args.jobs, quiet=args.quiet, dask_address=args.dask_address,
    )


def benchmark(
    edits: str, methods: str, world: str | None = None, edits_file: str | None = None,
    world_set: list[str] | None = None, settings: list[str] | None = None, device: str = "cpu",
    dtype: str = "float32", name: str | None = None, out: str | None = None, tracking_uri: str | None = None,
    artifact_root: str | None = None, log_mlflow: bool = True, jobs: int = 1, quiet: bool = False,
    dask_address: str | None = None,
) -> dict:
    """Build the world, measure every method in its own process, write the report, log it. Returns it.
    ``edits`` and ``methods`` are comma-separated, ``world_set`` and ``settings`` KEY=VALUE items."""
    counts = parse_counts(edits)
    edits_file = edits_file or None  # `mlflow run` passes "" for "no file: the default world"
    methods = [m.strip() for m in methods.split(",") if m.strip()]
    overrides = dict(split_setting(item) for item in settings or [])
    for method in methods:
        make_config(method, overrides=overrides)  # a bad method or setting fails here, before any work
    built = prepare_world(world, edits_file, world_set, quiet)
    if built.info["edits"] < counts[-1]:
        raise UsageError(f"--edits asks for {counts[-1]} sequential edits, but {built.info['source']} "
                         f"gives {built.info['edits']} edit requests")
    name = name or next(Path(p).stem for p in (edits_file, world, "default-world") if p)
    out = Path(out or Path("bench/results") / name)
    out.mkdir(parents=True, exist_ok=True)
    measured = [Job(str(built.path), method, counts, overrides, device, dtype, out=str(out),
                    progress=not quiet and jobs == 1, threads=threads_per_job(jobs)) for method in methods]
    rows = run_jobs(measured, jobs, quiet, dask_address)  # a finished method's summary is kept: re-running resumes
    report = build_report(name, edits_file, built, counts, rows, device, dtype)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(markdown(report))
    if log_mlflow:
        report["mlflow_runs"] = log_to_mlflow(report, out, tracking_uri, artifact_root)
    return report


def run_and_print(prog: str, parser: argparse.ArgumentParser, run_report, render, argv: list[str] | None) -> int:
    """A benchmark's command line: parse, run, print the markdown; a user mistake is one line and exit 2."""
    args = parser.parse_args(argv)
    try:
        report = run_report(args)
    except (UsageError, EditDataError, ConfigError, ModelLoadError) as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2
    print(render(report))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_and_print("bench.compare", build_parser(), run, markdown, argv)


if __name__ == "__main__":
    sys.exit(main())
