"""How much of a fluency change one edit makes on its own: each chosen edit, alone, on a fresh copy of the world's
model, then the fluency of the greedy generations from the first ``--requests`` edit prompts (as
``bench.lifelong`` scores them after its last edit), against the unedited model's.

    python -m bench.fluency --seed 2 --edits 434                 # the edit behind seed 2's fluency drop
    python -m bench.fluency --seed 2 --edits 434 --target 434="United Kingdom"

Fluency on a small world moves with whichever fact its generic continuation visits: a 1,000-edit run whose
fluency falls by as much as one correct edit alone makes it fall adds nothing of its own. ``--target`` gives an
edit another target of the same kind (a control: a target as many tokens long as the old answer).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from bench.compare import run_and_print
from kdpo.cli import UsageError
from kdpo.config import split_setting
from kdpo.editing import build_editor, make_config, withhold_evaluation_text
from kdpo.evaluation import greedy_generate
from kdpo.loaders import load_requests
from kdpo.metrics import mean, ngram_entropy
from kdpo.modeling import load_model
from kdpo.tables import format_table
from kdpo.world import build_world, model_corpus, world_config

FLUENCY_TOKENS = 24  # as run_sequential scores fluency


def fluency(world_path: str, requests: list, edits=(), method: str = "kdpo", overrides=None) -> float:
    """Mean fluency of the greedy generations from the ``requests``' prompts after ``edits`` (none: the unedited
    model); the editor's corpus is without the requests' evaluation text, as in ``run_sequential``."""
    model, tokenizer = load_model(world_path)
    if edits:
        corpus = withhold_evaluation_text(model_corpus(world_path), requests)
        editor = build_editor(model, tokenizer, method, make_config(method, overrides=overrides), corpus)
        for request in edits:
            editor.edit(request)
    generations = greedy_generate(model, tokenizer, [r.prompt for r in requests], FLUENCY_TOKENS)
    return mean(ngram_entropy(text) for text in generations)


def run(args: argparse.Namespace) -> dict:
    if args.model:
        world_path = args.model
    else:
        settings = dict(split_setting(item, "--world-set") for item in args.world_set or []) | {"seed": str(args.seed)}
        world_path = str(build_world(world_config(settings), progress=not args.quiet).path)
    requests = list(load_requests(Path(world_path) / "edits.jsonl").requests)[: args.requests]
    try:
        indices = [int(i) for i in args.edits.split(",")]
        targets = {int(i): target for i, target in (split_setting(item, "--target") for item in args.target or [])}
    except ValueError:
        raise UsageError(f"--edits and --target take request indices such as 434, got {args.edits!r}") from None
    overrides = dict(split_setting(item) for item in args.set or [])
    if not all(0 <= i < len(requests) for i in indices + list(targets)):
        raise UsageError(f"--edits and --target take indices of the first {len(requests)} requests, got {args.edits}")
    make_config(args.method, overrides=overrides)  # a bad setting fails before any work
    before = fluency(world_path, requests)
    rows = []
    for index in indices:
        request = requests[index]
        if index in targets:
            request = dataclasses.replace(request, target_new=targets[index])
        after = fluency(world_path, requests, [request], args.method, overrides)
        rows.append({"edit": index, "case_id": request.case_id, "target_new": request.target_new,
                     "ground_truth": request.ground_truth, "fluency": after, "change": after / before - 1})
    report = {"world": world_path, "seed": None if args.model else args.seed, "requests": len(requests),
              "method": args.method, "fluency_before": before, "rows": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))
    return report


def markdown(report: dict) -> str:
    headers = ["edit", "case_id", "old answer", "target", "fluency", "change"]
    rows = [[r["edit"], r["case_id"], r["ground_truth"], r["target_new"], f"{r['fluency']:.3f}",
             f"{100 * r['change']:+.1f}%"] for r in report["rows"]]
    world = report["world"] if report["seed"] is None else f"world seed {report['seed']}"
    return (f"# One edit alone ({world}, {report['method']}; fluency over the first "
            f"{report['requests']} edit prompts, {report['fluency_before']:.3f} unedited)\n\n"
            f"{format_table(headers, rows, markdown=True)}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.fluency", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a kdpo world directory (instead of --seed)")
    parser.add_argument("--seed", type=int, default=0, help="world seed (default 0)")
    parser.add_argument("--world-set", action="append", metavar="KEY=VALUE", help="another world setting")
    parser.add_argument("--edits", required=True, help="indices of the edit requests to make, each alone: 434,384")
    parser.add_argument("--target", action="append", metavar="INDEX=TARGET", help="give edit INDEX this target")
    parser.add_argument("--requests", type=int, default=1000, help="fluency over the first N edit prompts (1000)")
    parser.add_argument("--method", default="kdpo")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="an editor setting")
    parser.add_argument("--out", help="write the report as JSON here")
    parser.add_argument("--quiet", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_and_print("bench.fluency", build_parser(), run, markdown, argv)


if __name__ == "__main__":
    sys.exit(main())
