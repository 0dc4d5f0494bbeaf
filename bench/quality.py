"""Quality benchmark: KDPO, DPO, FT-L and FT-M side by side, N sequential edits on one world, one run.

    python -m bench.quality                      # 100 edits on the default world
    python -m bench.quality --edits 20 --methods kdpo,ft-m --set protection=none

Writes ``bench/results/quality.{json,md}``: final and immediate edit success, generalization, locality,
retention, fluency and seconds per edit, each tagged with the evaluation schedule, and the targets of
the foundation issue checked against the measured figures.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from kdpo.cli import format_table
from kdpo.editing import make_config, run_sequential
from kdpo.evaluation import probe
from kdpo.loaders import load_requests
from kdpo.modeling import load_model
from kdpo.world import WorldConfig, build_world

TARGETS = {"edit_success": 0.95, "generalization": 0.80, "locality": 0.90, "retention": 0.85}
METHODS = ("kdpo", "dpo", "ft-l", "ft-m")


def headline(summary: dict) -> dict:
    """The four figures the targets are set on, all measured after the last edit."""
    final = summary["final"]
    return {
        "edit_success": final["edit_success"], "generalization": final["generalization"],
        "locality": final["locality"], "retention": summary["retention"],
    }


def run(args) -> dict:
    world = build_world(WorldConfig(seed=args.world_seed), progress=True)
    requests = load_requests(world.edits_path, limit=args.edits).requests
    overrides = dict(item.split("=", 1) for item in args.set or [])
    model, tokenizer = load_model(world.path)
    baseline = probe(model, tokenizer, requests)  # one baseline for every method: the same world
    rows = []
    for method in args.methods.split(","):
        model, tokenizer = load_model(world.path)
        config = make_config(method, overrides=overrides)
        started = time.perf_counter()
        result = run_sequential(model, tokenizer, requests, method, config, world.corpus(), baseline)
        summary = result.summary()
        rows.append({"method": method, "config": result.config, "summary": summary, "headline": headline(summary),
                     "mean_of_four": sum(headline(summary).values()) / 4,
                     "wall_seconds": round(time.perf_counter() - started, 1)})
    return {
        "world": {"path": str(world.path), **{k: world.info[k] for k in ("parameters", "recall", "facts", "seconds")}},
        "edits": len(requests), "schedule": result.schedule, "protocol": result.protocol,
        "targets": TARGETS, "machine": {"platform": platform.platform(), "torch_threads": torch.get_num_threads()},
        "rows": rows,
    }


def markdown(report: dict) -> str:
    headers = ["method", "ES imm.", "ES final", "GEN final", "LOC final", "RET", "mean of 4", "fluency", "s/edit"]
    rows = [
        [r["method"], r["summary"]["immediate"]["edit_success"], *r["headline"].values(), r["mean_of_four"],
         r["summary"]["final"]["fluency"], r["summary"]["seconds_per_edit"]]
        for r in report["rows"]
    ]
    fluency_before = report["rows"][0]["summary"]["fluency_before"]
    lines = [
        f"# Quality benchmark: {report['edits']} sequential edits on the default world",
        "",
        f"World: {report['world']['parameters']:,} parameters, recall {report['world']['recall']}.",
        f"Schedule: {report['schedule']}.",
        f"ES/GEN/LOC final and RET are measured after the last edit; fluency before editing: {fluency_before:.3f}.",
        "",
        "```",
        format_table(headers, rows),
        "```",
        "",
        f"Targets for KDPO: {report['targets']}, and ahead of every baseline on the mean of the four.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--edits", type=int, default=100)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--world-seed", type=int, default=0)
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="editor setting for every method")
    parser.add_argument("--out", default="bench/results/quality")
    args = parser.parse_args()
    report = run(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
