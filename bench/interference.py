"""Same-subject interference of the edit memory: what a slot does to the answers its gate opens on that are not
its own edits (after 1,000 edits, the only place the memory loses locality).

    python -m bench.interference                                      # default world, 60 subjects, defaults
    python -m bench.interference --vary memory.preserve_weight=1,4,16,64

Takes the world's first ``--requests`` edit requests (the corpus without their evaluation sentences, as
``run_sequential`` gives the editor), picks ``--subjects`` of their subjects at random, and makes every edit of
those subjects, in order, into one memory. Then it scores every locality prompt of those requests against the
unedited model (teacher-forced argmax agreement, as LOC): ``locality_gated`` over the prompts where some slot's
gate opens (another fact of an edited subject), ``locality`` over all; and ES and GEN of the edits made. Each
value of ``--vary`` runs once on a fresh model (with the ``--set`` settings), one after another.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

from bench.compare import run_and_print
from kdpo.config import split_setting
from kdpo.editing import build_editor, make_config, withhold_evaluation_text
from kdpo.evaluation import score_pairs
from kdpo.loaders import load_requests
from kdpo.memory import EditMemory
from kdpo.metrics import agreement, mean
from kdpo.modeling import load_model
from kdpo.tables import format_table
from kdpo.world import default_world, model_corpus


def measure(world_path: str, requests, subjects: set[str], method: str, overrides: dict[str, str]) -> dict:
    """Edit every request of ``subjects`` into a fresh copy of the world's model; the scores above."""
    model, tokenizer = load_model(world_path)
    corpus = withhold_evaluation_text(model_corpus(world_path), requests)
    edited = [r for r in requests if r.subject in subjects]
    locality = [(item.prompt, item.ground_truth) for r in requests for item in r.locality]
    _, before = score_pairs(model, tokenizer, locality)
    editor = build_editor(model, tokenizer, method, make_config(method, overrides=overrides), corpus)
    started, steps = time.process_time(), 0
    for request in edited:
        steps += editor.edit(request).steps
    cpu = time.process_time() - started
    _, after = score_pairs(model, tokenizer, locality)
    agreements = [agreement(b, a) for b, a in zip(before, after)]
    ids = tokenizer([prompt for prompt, _ in locality], return_tensors="pt", padding=True)["input_ids"]
    gated = set(EditMemory.of(model).mentions(ids)[0].tolist())
    edit_success, _ = score_pairs(model, tokenizer, [(r.prompt, r.target_new) for r in edited])
    generalization, _ = score_pairs(model, tokenizer, [(p, r.target_new) for r in edited for p in r.rephrase_prompts])
    return {"settings": overrides, "edits": len(edited), "edit_success": mean(edit_success),
            "generalization": mean(generalization), "locality": mean(agreements),
            "locality_gated": mean(agreements[i] for i in sorted(gated)), "gated_prompts": len(gated),
            "locality_ungated": mean(a for i, a in enumerate(agreements) if i not in gated),
            "steps_per_edit": steps / len(edited), "cpu_seconds_per_edit": cpu / len(edited)}


def run(args: argparse.Namespace) -> dict:
    world_path = args.model or str(default_world(progress=not args.quiet).path)
    requests = list(load_requests(Path(world_path) / "edits.jsonl").requests)[: args.requests]
    subjects = set(random.Random(args.seed).sample(sorted({r.subject for r in requests}), args.subjects))
    fixed = dict(split_setting(item) for item in args.set or [])
    varied = split_setting(args.vary, "--vary") if args.vary else None
    variants = [fixed | {varied[0]: value} for value in varied[1].split(",")] if varied else [fixed]
    for overrides in variants:
        make_config(args.method, overrides=overrides)  # a bad setting fails before any work
    rows = [measure(world_path, requests, subjects, args.method, overrides) for overrides in variants]
    report = {"model": world_path, "method": args.method, "requests": len(requests), "subjects": args.subjects,
              "seed": args.seed, "rows": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))
    return report


def markdown(report: dict) -> str:
    headers = ["settings", "edits", "ES", "GEN", "LOC (gated prompts)", "LOC (all)", "gated prompts", "steps/edit",
               "CPU s/edit"]
    rows = [[", ".join(f"{k}={v}" for k, v in r["settings"].items()) or "defaults", r["edits"], r["edit_success"],
             r["generalization"], r["locality_gated"], r["locality"], r["gated_prompts"], f"{r['steps_per_edit']:.1f}",
             f"{r['cpu_seconds_per_edit']:.2f}"] for r in report["rows"]]
    return (f"# Same-subject interference ({report['method']}, {report['subjects']} subjects of the first "
            f"{report['requests']} requests)\n\n{format_table(headers, rows, markdown=True)}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.interference", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a kdpo world directory (default: the built-in world)")
    parser.add_argument("--method", default="kdpo")
    parser.add_argument("--requests", type=int, default=1000, help="the world's first N requests (default 1000)")
    parser.add_argument("--subjects", type=int, default=60, help="subjects edited (default 60)")
    parser.add_argument("--seed", type=int, default=0, help="which subjects")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="an editor setting, for every run")
    parser.add_argument("--vary", metavar="KEY=V1,V2,...", help="one editor setting: a run for each value")
    parser.add_argument("--out", help="write the report as JSON here")
    parser.add_argument("--quiet", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_and_print("bench.interference", build_parser(), run, markdown, argv)


if __name__ == "__main__":
    sys.exit(main())
