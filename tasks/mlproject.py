"""The MLproject's ``world`` and ``evaluate`` entry points: the ``kdpo`` step, with its settings as params and
its figures as metrics of the run ``mlflow run`` started (or of a new run in the current experiment).

    mlflow run . -e world -P seed=1 --env-manager local
    mlflow run . -e evaluate -P model=models:/kdpo-world@champion -P baseline_model=models:/kdpo-world/1 --env-manager local
"""
from __future__ import annotations

import argparse
from dataclasses import asdict

import mlflow

from kdpo.evaluation import compare_to_baseline
from kdpo.loaders import load_requests
from kdpo.world import WorldConfig, build_world, world_config
from tasks.tracking import flat_metrics, model_directory


def world(settings: dict[str, str]) -> dict:
    """Build (or reuse) the world with these settings; log its settings, recall, epochs, size and build time."""
    built = build_world(world_config(settings), progress=False)
    info = built.info
    with mlflow.start_run():
        mlflow.log_params({f"world/{k}": v for k, v in asdict(WorldConfig(**info["config"])).items()})
        mlflow.set_tags({"kdpo.world_key": info["key"], "kdpo.world_path": str(built.path)})
        mlflow.log_metrics({**flat_metrics("world/recall", info["recall"]), "world/recall_met": float(info["recall_met"]),
                            "world/epochs": info["epochs"], "world/seconds": info["seconds"],
                            "world/parameters": info["parameters"]})
        mlflow.log_dict(info, "world/world.json")
    return info


def evaluate(model: str, baseline_model: str, edits: str | None = None) -> dict:
    """Score ``model`` against ``baseline_model`` (directories or ``models:/`` URIs) on an edit file (default:
    the baseline's own edits); log both summaries and what was scored."""
    model_dir, baseline_dir = model_directory(model), model_directory(baseline_model)
    requests = load_requests(edits or f"{baseline_dir}/edits.jsonl").requests
    scores = compare_to_baseline(model_dir, baseline_dir, requests)
    with mlflow.start_run():
        mlflow.log_params({"model": model, "baseline_model": baseline_model, "edits": edits or "baseline's edits.jsonl",
                           "requests": len(requests)})
        mlflow.log_metrics(flat_metrics("eval", scores))
    return scores


def main(argv: list[str] | None = None) -> None:
    """``python -m tasks.mlproject world|evaluate ...`` (what the MLproject's entry points run)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    world_parser = commands.add_parser("world", help="build the world and log it")
    world_parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a world setting")
    evaluate_parser = commands.add_parser("evaluate", help="score an edited model against its baseline and log it")
    evaluate_parser.add_argument("--model", required=True, help="edited model: a directory or models:/ URI")
    evaluate_parser.add_argument("--baseline-model", required=True, help="the model before editing (directory or models:/)")
    evaluate_parser.add_argument("--edits", help="edit-request file (default: the baseline's edits.jsonl)")
    args = parser.parse_args(argv)
    if args.command == "world":
        if bad := [item for item in args.set if "=" not in item]:
            parser.error(f"--set takes KEY=VALUE, got {bad[0]!r}")
        world(dict(item.split("=", 1) for item in args.set))
    else:
        evaluate(args.model, args.baseline_model, args.edits)


if __name__ == "__main__":
    main()
