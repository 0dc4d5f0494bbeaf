"""Speed and memory of editing a model of a real size: a randomly initialised model of a named shape.

    python -m bench.scale --shape qwen2-0.5b --device cuda --dtype bfloat16 --edits 10,25 --methods kdpo,ft-m
    python -m bench.scale --shape qwen2-0.5b --shape-set num_hidden_layers=2 --edits 3   # a quick CPU look

No machine here reaches a model hub, so a real-size model is made here: the shape's config (the public
architecture's sizes: layers, widths, heads, vocabulary), random weights from a fixed seed, and a world's
tokenizer, edit requests and corpus (the default world unless ``--world``). It is saved as a world
directory and measured by ``bench.compare``: one process per method, seconds per edit and peak memory
(``torch.cuda.max_memory_allocated`` on a GPU) against the model + trained-delta budget.

Quality figures of such a run mean nothing (the weights are random) and the report says so; and since a
random model rarely meets the stop margin early, most edits take the full step budget, so the seconds per
edit are an upper bound for that editor setting.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from bench.compare import DASK_ADDRESS_HELP, METHODS, benchmark, markdown, prepare_world, run_and_print
from kdpo.cli import UsageError
from kdpo.config import ConfigError, coerce_setting, split_setting
from kdpo.world import World

# Sizes of the public configs (config.json of each model on the hub), architecture only.
SHAPES: dict[str, dict] = {
    "qwen2-0.5b": {"model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
                   "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936,
                   "max_position_embeddings": 32768, "rope_theta": 1e6, "rms_norm_eps": 1e-6,
                   "tie_word_embeddings": True},
    "qwen2-1.5b": {"model_type": "qwen2", "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
                   "num_attention_heads": 12, "num_key_value_heads": 2, "vocab_size": 151936,
                   "max_position_embeddings": 32768, "rope_theta": 1e6, "rms_norm_eps": 1e-6,
                   "tie_word_embeddings": True},
}
WORLD_FILES = ("tokenizer.json", "tokenizer_config.json", "edits.jsonl", "corpus.txt")


def shape_config(shape: str, overrides: dict[str, str] | None = None):
    """The transformers config of ``shape`` with ``overrides`` (values typed like the shape's own)."""
    if shape not in SHAPES:
        raise UsageError(f"unknown --shape {shape!r}; choose from {', '.join(SHAPES)}")
    sizes = dict(SHAPES[shape])
    for key, text in (overrides or {}).items():
        if key not in sizes or key == "model_type":
            raise UsageError(f"--shape-set {key}: not a size of {shape}; choose from "
                             f"{', '.join(k for k in sizes if k != 'model_type')}")
        try:
            sizes[key] = coerce_setting(key, text, sizes[key])
        except ConfigError as error:
            raise UsageError(f"--shape-set {key}: {error}") from None
    return AutoConfig.for_model(**sizes)


def make_scaled_world(world: World, shape: str, out: Path, overrides: dict[str, str] | None = None,
                      seed: int = 0) -> World:
    """Save a randomly initialised ``shape`` model with ``world``'s tokenizer, edits and corpus as a world
    directory at ``out`` (reused when it already holds the same shape, overrides and world)."""
    config = shape_config(shape, overrides)
    vocab = world.info["vocab_size"]
    if config.vocab_size < vocab:
        raise UsageError(f"--shape {shape}: vocabulary {config.vocab_size} is smaller than the world's tokenizer ({vocab})")
    identity = {"shape": shape, "overrides": dict(overrides or {}), "seed": seed, "world": world.info["key"]}
    info_path = out / "world.json"
    if info_path.exists() and json.loads(info_path.read_text()).get("scaled_from") == identity:
        return World(out, json.loads(info_path.read_text()) | {"cached": True})
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(out)
    for name in WORLD_FILES:
        shutil.copy(world.path / name, out / name)
    info = world.info | {
        "key": f"{world.info['key']}-{shape}", "scaled_from": identity,
        "source": f"random-init {shape} ({', '.join(f'{k}={v}' for k, v in (overrides or {}).items()) or 'public sizes'}) "
                  f"with the tokenizer, edits and corpus of world {world.info['key']}; quality figures are meaningless",
        "parameters": sum(p.numel() for p in model.parameters()), "vocab_size": config.vocab_size,
        "recall": {}, "recall_met": None, "epochs": 0, "seconds": 0.0,  # random weights: no recall to measure
    }
    info.pop("cached", None)
    info_path.write_text(json.dumps(info, indent=2))
    return World(out, info)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="qwen2-0.5b", help=f"model shape, from {', '.join(SHAPES)}")
    parser.add_argument("--shape-set", action="append", metavar="KEY=VALUE",
                        help="override one size of the shape, e.g. num_hidden_layers=2")
    parser.add_argument("--world", help="the world whose tokenizer, edits and corpus to use (default: the default world)")
    parser.add_argument("--edits", default="10,25", help="comma-separated sequential edit counts (default 10,25)")
    parser.add_argument("--methods", default="kdpo,ft-m", help=f"comma-separated, from {', '.join(METHODS)}")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="an editor setting, for every method")
    parser.add_argument("--device", default="auto", choices=("cpu", "cuda", "auto"))
    parser.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    parser.add_argument("--models", default="bench/results/models", help="where the random models are saved")
    parser.add_argument("--name", help="report name (default: scale-SHAPE-DTYPE)")
    parser.add_argument("--out", help="report folder (default: bench/results/NAME)")
    parser.add_argument("--dask-address", help=DASK_ADDRESS_HELP)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def run_scaled(args: argparse.Namespace) -> dict:
    """Make (or reuse) the random model, then run ``bench.compare`` on it; no MLflow logging."""
    overrides = dict(split_setting(item, "--shape-set") for item in args.shape_set or [])
    base = prepare_world(args.world, quiet=args.quiet)
    suffix = "".join(f"-{k}{v}" for k, v in sorted(overrides.items()))
    world = make_scaled_world(base, args.shape, Path(args.models) / f"{args.shape}{suffix}", overrides)
    name = args.name or f"scale-{args.shape}{suffix}-{args.dtype}"
    return benchmark(args.edits, args.methods, world=str(world.path), settings=args.set, device=args.device,
                     dtype=args.dtype, name=name, out=args.out, log_mlflow=False, quiet=args.quiet,
                     dask_address=args.dask_address)


def main(argv: list[str] | None = None) -> int:
    return run_and_print("bench.scale", build_parser(), run_scaled, markdown, argv)


if __name__ == "__main__":
    sys.exit(main())
