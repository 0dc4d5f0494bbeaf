"""``kdpo``: build the knowledge world, probe what a model knows, edit it, evaluate it.

Examples::

    kdpo world build                    # pre-train the built-in world (cached), report its recall
    kdpo probe --limit 5                # what the world answers now for its first 5 edit prompts
    kdpo edit --n 20                    # 20 sequential KDPO edits on the world, result table
    kdpo edit --method ft-m --set protection=none --set weights.lr=1e-3 --n 50 --json
    kdpo edit --model ./my-hf-model --edits counterfact.json --protection-corpus wiki.txt
    kdpo evaluate --model ./edited --baseline-model ./original --edits edits.jsonl
    kdpo edit --n 20 --save edited/     # the edits live in edited/edit_memory.safetensors beside the weights
    kdpo memory list --model edited/    # the edited subjects and their facts
    kdpo memory remove CASE_ID --model edited/   # take one edit back (its slot is retrained without it)
    kdpo report result.json --out report/  # HTML report + PNG plots of a result (or of a benchmark's report.json)
    kdpo report RUN_ID                  # the same for a refresh run in MLflow
    kdpo report --compare --last 10     # the last 10 refreshes of the experiment, over time
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from contextlib import contextmanager
from pathlib import Path

from kdpo.config import ConfigError, split_setting
from kdpo.loaders import FORMATS, EditDataError, check_context, context_limit, error_line, load_requests, one_line
from kdpo.requests import SkippedRecord
from kdpo.tables import TABLE, format_cell, format_table, summary_table


class UsageError(Exception):
    """A user mistake the CLI reports in one line, without a traceback."""


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (the usage is one ``--help`` away)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)\n")


def _count(text: str) -> int:
    """A count option's value: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _method(name: str) -> str:
    """An editor name. The editors are imported here, not at the top: with torch they take seconds,
    which a mistyped option should not wait for."""
    from kdpo.editors import EDITORS

    if name not in EDITORS:
        raise argparse.ArgumentTypeError(f"invalid choice: {name!r} (choose from {', '.join(sorted(EDITORS))})")
    return name


def _check_output(path: str | None, option: str, directory: bool) -> None:
    """A usage error, before any work is done, when ``path`` (a file, or with ``directory`` a folder)
    cannot be written there: a file stands on its way, or the folder it would go into is not writable."""
    if path is None:
        return
    target = Path(path).absolute()
    existing = next(p for p in (target, *target.parents) if p.exists())
    if existing == target and target.is_dir() != directory:
        raise UsageError(f"{option} {path}: is {'a file' if directory else 'a directory'}; "
                         f"expected {'a directory' if directory else 'a file'}")
    if existing != target and not existing.is_dir():
        raise UsageError(f"{option} {path}: {existing} is a file, not a directory")
    folder = existing if existing.is_dir() else existing.parent
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"{option} {path}: the directory {folder} is not writable")


@contextmanager
def _writing(option: str, path):
    """Report an ``OSError`` raised while writing ``path`` (given as ``option``) as a one-line usage error."""
    try:
        yield
    except OSError as error:
        at = f" ({error.filename})" if error.filename and str(error.filename) != str(path) else ""
        raise UsageError(f"{option} {path}: cannot write: {error.strerror or error}{at}") from error


# --- shared option groups ---------------------------------------------------------------------


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model and data")
    group.add_argument("--model", help="a Hugging Face causal-LM directory or hub id (default: the built-in world)")
    group.add_argument("--edits", help="edit-request file (default: the world's own counterfactual edits)")
    group.add_argument("--format", default="auto", choices=("auto",) + FORMATS, help="edit file format (default: detect)")
    group.add_argument("--limit", "--n", type=_count, dest="limit",
                       help="use the first N requests (every record of the file is still checked)")
    group.add_argument("--skip-invalid", action="store_true", help="skip invalid records and list them")
    group.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"), help="where the model runs")
    group.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    group.add_argument("--json", action="store_true", help="print one JSON document instead of tables")


def _model_and_requests(args) -> tuple[str, Path, list, list[str] | None]:
    """Model path, edit file, its requests and (for worlds) the corpus the model was trained on.

    A file given with ``--edits`` is read first, so a mistake in it is reported before any model or world loads.
    """
    requests = _load_edits(args, Path(args.edits)) if args.edits else None
    from kdpo.world import default_world, model_corpus

    if args.model:
        model_path = args.model
        local = Path(model_path)
        corpus = model_corpus(local)
        edits = Path(args.edits) if args.edits else (local / "edits.jsonl" if (local / "edits.jsonl").exists() else None)
    else:
        world = default_world(progress=not args.json)
        model_path, corpus = str(world.path), world.corpus()
        edits = Path(args.edits) if args.edits else world.edits_path
    if edits is None:
        raise UsageError("--edits FILE is required for a model that is not a kdpo world")
    return model_path, edits, requests or _load_edits(args, edits), corpus


def _load_edits(args, path: Path):
    """The requests of the edit file (the whole file is checked; the first ``--limit`` are kept)."""
    loaded = load_requests(path, format=args.format, skip_invalid=args.skip_invalid, limit=args.limit)
    _report_skipped(path, loaded.skipped)
    if not loaded.requests:
        raise UsageError(f"{path}: no valid edit requests")
    return loaded.requests


def _report_skipped(path, skipped: list[SkippedRecord]) -> None:
    """One stderr line per record left out under ``--skip-invalid``."""
    for record in skipped:
        print("skipped: " + error_line(path, record.message, index=record.index, case_id=record.case_id,
                                       field=record.field), file=sys.stderr)


def _check_context(requests, tokenizer, config, edits_path) -> None:
    """Refuse prompts that, with their answers, do not fit the model's context (the limit named)."""
    check_context(requests, tokenizer, context_limit(config), edits_path)


# --- commands ---------------------------------------------------------------------------------


def cmd_world_build(args) -> int:
    if args.skip_invalid and not args.from_file:
        raise UsageError("--skip-invalid needs --from FILE (the shipped fact table has no invalid records)")
    from kdpo.world import build_world, cache_root, world_config

    config = world_config(dict(split_setting(item) for item in args.set or []))
    _check_output(args.out, "--out", directory=True)
    with _writing("--out", args.out or cache_root()):
        world = build_world(config, from_file=args.from_file, out=args.out, force=args.force, progress=not args.json,
                            skip_invalid=args.skip_invalid)
    _report_skipped(args.from_file, [SkippedRecord(**item) for item in world.info.get("skipped", [])])
    if args.json:
        print(json.dumps({"path": str(world.path), **world.info}, indent=2))
        return 0
    info = world.info
    print(f"world: {world.path}{' (cached)' if info.get('cached') else ''}")
    print(f"source: {info['source']}  parameters: {info['parameters']:,}  vocabulary: {info['vocab_size']}")
    print(f"trained {info['epochs']} epochs in {info['seconds']} s on {info['torch_threads']} threads")
    print(format_table(["facts learned", "recall"], [[k, v] for k, v in info["recall"].items()]))
    print(f"default edit requests: {world.edits_path} ({info['edits']})")
    return 0


def cmd_probe(args) -> int:
    model_path, edits_path, requests, _ = _model_and_requests(args)
    from kdpo.evaluation import first_sentence, probe
    from kdpo.modeling import load_model

    model, tokenizer = load_model(model_path, args.device, args.dtype)
    _check_context(requests, tokenizer, model.config, edits_path)
    result = probe(model, tokenizer, requests)
    rows = [
        {"case_id": r.case_id, "prompt": r.prompt, "answers_now": first_sentence(generation),
         "ground_truth": r.ground_truth, "target_new": r.target_new, "target_new_accuracy": s.edit_success,
         "generation": generation}
        for r, generation, s in zip(requests, result.answers, result.scores)
    ]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(format_table(list(rows[0])[:-1], [list(row.values())[:-1] for row in rows]))
    return 0


def cmd_edit(args) -> int:
    from kdpo.editing import make_config, run_sequential
    from kdpo.modeling import load_model, save_edited

    _check_output(args.output, "--output", directory=False)
    _check_output(args.save, "--save", directory=True)
    overrides = dict(split_setting(item) for item in args.set or [])
    config = make_config(args.method, args.config, overrides)
    model_path, edits_path, requests, corpus = _model_and_requests(args)
    if args.protection_corpus:
        from kdpo.keystats import read_corpus

        corpus = read_corpus(args.protection_corpus, args.corpus_budget)
    model, tokenizer = load_model(model_path, args.device, args.dtype)
    _check_context(requests, tokenizer, model.config, edits_path)
    result = run_sequential(model, tokenizer, requests, args.method, config, corpus, progress=not args.json)
    if args.output:
        with _writing("--output", args.output):
            result.write_json(args.output)
    if args.save:
        with _writing("--save", args.save):
            save_edited(model, tokenizer, args.save, source=model_path, new_facts=requests)
    if args.json:
        print(json.dumps(result.to_dict() if args.full else {"summary": result.summary(), "schedule": result.schedule,
                                                               "config": result.config}, indent=2))
        return 0
    print(f"model: {model_path}\nedits: {edits_path} ({len(requests)} sequential, method {args.method})")
    print(summary_table([result.summary()]))
    print(f"fluency before editing: {format_cell(result.summary()['fluency_before'])}")
    print(f"schedule: {result.schedule}")
    for module in result.protection:
        print(f"null space of {module['module']}: {module['dim'] - module['protected_at_start']} of {module['dim']} "
              f"key directions free before editing, {module['free_at_end']} after; committed edits' keys "
              f"kept softly in {module['soft_memory_rank']} directions")
    if result.memory:
        memory = result.memory
        print(f"edit memory: {memory['slots']} subjects, {memory['facts']} facts, "
              f"{memory['bytes_per_edit'] / 1024:.1f} KiB per edit; a slot opened in "
              f"{memory['gate_rate']:.0%} of the sequences of the final evaluation")
    if args.save:
        print(f"edited model saved to {args.save}")
    return 0


def cmd_memory_list(args) -> int:
    memory = _model_memory(args)[2]
    rows = [[slot.subject, fact.case_id, fact.prompt, fact.target_new]
            for slot in memory.slots for fact in slot.facts]
    if args.json:
        print(json.dumps({"stats": memory.stats(), "facts": [dict(zip(("subject", "case_id", "prompt", "target_new"), r))
                                                              for r in rows]}, indent=2))
        return 0
    stats = memory.stats()
    print(f"{stats['slots']} subjects, {stats['facts']} facts, rank {stats['rank']} on {', '.join(stats['modules'])}")
    if rows:
        print(format_table(["subject", "case_id", "prompt", "target_new"], rows))
    return 0


def cmd_memory_remove(args) -> int:
    from kdpo.editing import memory_editor
    from kdpo.world import model_corpus

    model, tokenizer, memory = _model_memory(args)
    editor = memory_editor(model, tokenizer, args.method, model_corpus(args.model))
    for case_id in args.case_ids:
        if not editor.revert(case_id):
            raise UsageError(f"{args.model}: no edit with case_id {case_id!r} in the edit memory (see kdpo memory list)")
    from kdpo.modeling import save_edited

    with _writing("--model", args.model):
        save_edited(model, tokenizer, args.model, source=args.model)
    print(f"removed {', '.join(args.case_ids)}; {len(memory.slots)} subjects remain in {args.model}")
    return 0


def _model_memory(args):
    """The model of ``--model``, its tokenizer and its edit memory (a usage error if it has none)."""
    from kdpo.memory import EditMemory
    from kdpo.modeling import load_model

    model, tokenizer = load_model(args.model, args.device)
    memory = EditMemory.of(model)
    if memory is None:
        raise UsageError(f"{args.model} has no edit memory (edit_memory.safetensors)")
    return model, tokenizer, memory


def cmd_evaluate(args) -> int:
    if not args.model:
        raise UsageError("evaluate needs --model (the edited model) and --baseline-model (the model before editing)")
    model_path, edits_path, requests, _ = _model_and_requests(args)
    from transformers import AutoConfig, AutoTokenizer

    from kdpo.evaluation import compare_to_baseline
    from kdpo.modeling import ModelLoadError

    try:
        tokenizer, config = AutoTokenizer.from_pretrained(model_path), AutoConfig.from_pretrained(model_path)
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"cannot load a causal LM from {model_path}: {error}") from error
    _check_context(requests, tokenizer, config, edits_path)
    summary = compare_to_baseline(model_path, args.baseline_model, requests, args.device, args.dtype)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(format_table(["", *TABLE], [[k, *(v.get(m) for m in TABLE)] for k, v in summary.items()]))
    return 0


def cmd_report(args) -> int:
    """HTML report + PNGs of a result/benchmark file or an MLflow refresh run, or the last refreshes compared.

    MLflow is read by ``tasks.dashboards``, imported here lazily: ``kdpo`` itself never imports MLflow.
    """
    from kdpo.report import ReportInputError, render, render_compare, write_report

    if bool(args.source) == args.compare:
        raise UsageError("report needs a SOURCE (result/benchmark JSON file or MLflow run id), or --compare")
    out = Path(args.out)
    _check_output(args.out, "--out", directory=True)
    try:
        with _writing("--out", out):
            if args.source and Path(args.source).is_file():
                path = render(_read_json(args.source), out)
            elif args.source and not re.fullmatch(r"[0-9a-f]{32}", args.source):
                raise UsageError(f"{args.source}: no such file, and not an MLflow run id")
            else:
                try:
                    from tasks import dashboards
                except ImportError as error:  # the pipeline's code and its extra are not where kdpo runs
                    raise UsageError(f"reading an MLflow run needs the pipeline ({error}): run kdpo from a checkout "
                                     "of kdpo-refresh with its pipeline extra (pip install -e '.[pipeline]')") from error
                client = dashboards.client(args.tracking_uri)
                if args.compare:
                    out.mkdir(parents=True, exist_ok=True)
                    experiment = dashboards.experiment_id(client, args.experiment)
                    path = write_report(render_compare(dashboards.recent_refreshes(client, experiment, args.last), out), out)
                else:
                    path = render(dashboards.run_result(client, args.source), out)
    except ReportInputError as error:
        raise UsageError(f"{args.source or args.experiment}: {error}") from error
    print(path)
    return 0


def _read_json(path: str):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise UsageError(f"cannot read {path} as JSON: {error}") from error


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="kdpo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    world = commands.add_parser("world", help="build the built-in knowledge world")
    world_commands = world.add_subparsers(dest="world_command", required=True, metavar="ACTION")
    build = world_commands.add_parser("build", help="pre-train the world model (cached by its inputs)")
    build.add_argument("--from", dest="from_file",
                       help="learn the true facts of this edit-request file instead (and, as text, the names its "
                            "edits target)")
    build.add_argument("--out", help="write the world here (default: the cache, $KDPO_HOME/worlds/KEY)")
    build.add_argument("--set", action="append", metavar="KEY=VALUE",
                       help="override one world setting, e.g. --set seed=1 --set max_facts=300; --set preset=large "
                            "builds the 10,000-edit world (the table plus 1,770 generated people)")
    build.add_argument("--skip-invalid", action="store_true",
                       help="with --from: leave invalid records out (each is listed on stderr) instead of stopping")
    build.add_argument("--force", action="store_true", help="rebuild even if cached")
    build.add_argument("--json", action="store_true")
    build.set_defaults(handler=cmd_world_build)

    probe = commands.add_parser("probe", help="what the model answers now for each edit prompt")
    _add_model_options(probe)
    probe.set_defaults(handler=cmd_probe)

    edit = commands.add_parser("edit", help="apply edit requests one after another and score them")
    _add_model_options(edit)
    settings = edit.add_argument_group("editor")
    settings.add_argument("--method", default="kdpo", type=_method,
                          help="kdpo (default; online teacher-forced negatives), dpo (old answer as negative), "
                          "ft-m (target-masked fine-tuning), ft-l (ROME's constrained fine-tuning)")
    settings.add_argument("--config", help="YAML/JSON file of editor settings, or a preset name (paper)")
    settings.add_argument("--set", action="append", metavar="KEY=VALUE",
                          help="override one editor setting, e.g. --set memory.lr=1e-2 --set memory.rank=8 (a misspelt name lists them all)")
    settings.add_argument(
        "--protection-corpus",
        help="text the model knows, whose keys null-space protection keeps: a text file (one passage a line), "
        "a JSONL/JSON/Parquet/CSV file with a 'text' column, a datasets directory, or hf:NAME[:CONFIG]",
    )
    settings.add_argument("--corpus-budget", type=_count, default=20000, help="sample at most this many passages")
    out = edit.add_argument_group("output")
    out.add_argument("--output", help="write the full result (per-edit records, loss curves) as JSON here")
    out.add_argument("--save", help="save the edited model as a Hugging Face directory here")
    out.add_argument("--full", action="store_true", help="with --json: print the full result, not the summary")
    edit.set_defaults(handler=cmd_edit)

    memory = commands.add_parser("memory", help="list or remove the edits a model's edit memory holds")
    memory_commands = memory.add_subparsers(dest="memory_command", required=True, metavar="ACTION")
    listing = memory_commands.add_parser("list", help="the edited subjects and their facts")
    remove = memory_commands.add_parser("remove", help="take edits back: each subject's slot is retrained "
                                        "without them (or dropped), and the memory is saved in place")
    remove.add_argument("case_ids", nargs="+", metavar="CASE_ID")
    remove.add_argument("--method", default="kdpo", type=_method,
                        help="the loss that retrains a slot on its remaining facts (default kdpo)")
    for command, handler in ((listing, cmd_memory_list), (remove, cmd_memory_remove)):
        command.add_argument("--model", required=True, help="an edited model directory (kdpo edit --save)")
        command.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
        command.add_argument("--json", action="store_true")
        command.set_defaults(handler=handler)

    evaluate = commands.add_parser("evaluate", help="score an edited model against the model before editing")
    _add_model_options(evaluate)
    evaluate.add_argument("--baseline-model", required=True, help="the model before editing (locality reference)")
    evaluate.set_defaults(handler=cmd_evaluate)

    report = commands.add_parser("report", help="HTML report and PNG plots of a result, a benchmark or MLflow refreshes")
    report.add_argument("source", nargs="?", help="a result JSON (kdpo edit --output), a benchmark's report.json (bench.compare), "
                        "or an MLflow run id (a refresh or its edit step)")
    report.add_argument("--compare", action="store_true", help="compare the last refreshes of the experiment instead")
    report.add_argument("--last", type=_count, default=10, help="with --compare: how many refreshes (default 10)")
    report.add_argument("--experiment", default="knowledge-refresh", help="with --compare: the MLflow experiment")
    report.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlruns.db here)")
    report.add_argument("--out", default="kdpo-report", help="folder for report.html and the PNGs (default: kdpo-report)")
    report.set_defaults(handler=cmd_report)
    return parser


def _user_errors() -> tuple[type[Exception], ...]:
    """The errors ``main`` reports in one line. The model loader's error is one of them once the loader is
    imported (only then can it have been raised; importing it costs seconds of torch)."""
    modeling = sys.modules.get("kdpo.modeling")
    return (UsageError, EditDataError, ConfigError, *([modeling.ModelLoadError] if modeling else []))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except _user_errors() as error:
        print(f"kdpo: error: {one_line(str(error))}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
