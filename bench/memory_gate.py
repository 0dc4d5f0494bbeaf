"""What the edit memory costs a forward pass: the gate and the slots' changes, with 0 to 10,000 slots.

    python -m bench.memory_gate                       # default world, 0/100/1,000/10,000 slots
    python -m bench.memory_gate --slots 0,1000 --repeats 50

The model answers a batch of its own edit prompts. Slot i is keyed by the i-th subject of the world's edit
requests, then by made-up subjects (random sequences of 2-4 tokens; random single tokens would be common
words) once the world's subjects run out, and holds a random rank-r change; so a prompt opens the slot of its subject exactly as after real
edits. Every figure is CPU seconds per forward pass (process time, the median of ``--repeats``), measured
in one run against the same model without a memory, interleaved so that the machine's noise falls on both.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from bench.compare import run_and_print
from kdpo.loaders import load_requests
from kdpo.memory import EditMemory, subject_patterns
from kdpo.modeling import load_model
from kdpo.world import default_world

TARGET = 0.10  # the gate's overhead at 1,000 slots, as a share of a forward pass without memory


def fill(memory: EditMemory, tokenizer, subjects: list[str], count: int, seed: int = 0) -> None:
    """Give ``memory`` ``count`` slots: the given subjects first, then random token sequences."""
    generator = torch.Generator().manual_seed(seed)
    vocabulary = len(tokenizer)
    for index in range(count):
        if index < len(subjects):
            patterns = subject_patterns(tokenizer, subjects[index])
        else:
            length = int(torch.randint(2, 5, (1,), generator=generator))
            patterns = [torch.randint(4, vocabulary, (length,), generator=generator).tolist()]
        slot = memory.add_slot(f"subject {index}" if index >= len(subjects) else subjects[index], patterns)
        for b in memory.B:
            b[slot] = torch.randn(b.shape[1:], generator=generator) * 0.01


def cpu_seconds(model, encoded, repeats: int) -> list[float]:
    times = []
    with torch.no_grad():
        for _ in range(repeats):
            started = time.process_time()
            model(**encoded)
            times.append(time.process_time() - started)
    return times


def run(args: argparse.Namespace) -> dict:
    world_path = args.model or str(default_world(progress=not args.quiet).path)
    model, tokenizer = load_model(world_path)
    requests = load_requests(Path(world_path) / "edits.jsonl").requests
    subjects = list(dict.fromkeys(r.subject for r in requests))
    encoded = tokenizer([r.prompt for r in requests[: args.batch]], return_tensors="pt", padding=True)
    rows = []
    for count in [int(c) for c in args.slots.split(",")]:
        memory = EditMemory.attach(model, tuple(args.modules.split(",")), args.rank)
        fill(memory, tokenizer, subjects, count)
        cpu_seconds(model, encoded, 3)  # warm-up (pattern tables, allocator)
        with_memory, without = [], []
        for _ in range(args.repeats):  # interleaved: the noise of the machine falls on both
            with_memory += cpu_seconds(model, encoded, 1)
            memory.detach()
            without += cpu_seconds(model, encoded, 1)
            memory.hook()
        memory.detach()
        base, gated = statistics.median(without), statistics.median(with_memory)
        rows.append({"slots": count, "cpu_ms_without": 1000 * base, "cpu_ms_with": 1000 * gated,
                     "overhead": gated / base - 1, "bytes_per_slot": memory.stats()["bytes"] / max(count, 1)})
    report = {"model": world_path, "batch": encoded["input_ids"].shape[0], "tokens": encoded["input_ids"].shape[1],
              "rank": args.rank, "modules": args.modules, "repeats": args.repeats, "threads": torch.get_num_threads(),
              "target": f"overhead <= {TARGET:.0%} at 1,000 slots", "rows": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))
    return report


def markdown(report: dict) -> str:
    lines = [f"# Edit-memory gate overhead ({report['batch']} prompts x {report['tokens']} tokens, "
             f"rank {report['rank']} on {report['modules']}, {report['threads']} threads, median of "
             f"{report['repeats']})", "", "| slots | CPU ms without memory | CPU ms with | overhead |", "|---|---|---|---|"]
    lines += [f"| {r['slots']:,} | {r['cpu_ms_without']:.2f} | {r['cpu_ms_with']:.2f} | {r['overhead']:+.1%} |"
              for r in report["rows"]]
    return "\n".join(lines + ["", f"Target: {report['target']}.", ""])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.memory_gate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a kdpo world directory (default: the built-in world)")
    parser.add_argument("--slots", default="0,100,1000,10000", help="slot counts (default 0,100,1000,10000)")
    parser.add_argument("--batch", type=int, default=64, help="prompts per forward pass (default 64)")
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--modules", default="layers.1.mlp.down_proj")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", help="write the report as JSON here")
    parser.add_argument("--quiet", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_and_print("bench.memory_gate", build_parser(), run, markdown, argv)


if __name__ == "__main__":
    sys.exit(main())
