"""bench.scale: a random model of a named shape, with a world's tokenizer and data, measured by bench.compare."""
import json

import pytest
from transformers import AutoModelForCausalLM

from bench.scale import SHAPES, main, make_scaled_world, shape_config
from kdpo.cli import UsageError

SMALL = {"num_hidden_layers": "2", "hidden_size": "64", "intermediate_size": "128", "num_attention_heads": "4",
         "num_key_value_heads": "2", "vocab_size": "3000"}


def test_shape_config_keeps_the_public_sizes_and_types_overrides():
    config = shape_config("qwen2-0.5b")
    assert (config.model_type, config.hidden_size, config.intermediate_size, config.num_hidden_layers,
            config.vocab_size) == ("qwen2", 896, 4864, 24, 151936)
    assert shape_config("qwen2-0.5b", {"num_hidden_layers": "2"}).num_hidden_layers == 2
    with pytest.raises(UsageError, match="unknown --shape 'gpt5'"):
        shape_config("gpt5")
    with pytest.raises(UsageError, match="--shape-set layers: not a size of qwen2-0.5b"):
        shape_config("qwen2-0.5b", {"layers": "2"})
    with pytest.raises(UsageError, match="--shape-set hidden_size"):
        shape_config("qwen2-0.5b", {"hidden_size": "wide"})
    assert set(SHAPES) >= {"qwen2-0.5b"}


def test_scaled_world_is_a_random_model_with_the_worlds_data_and_is_reused(tiny_world, tmp_path):
    world = make_scaled_world(tiny_world, "qwen2-0.5b", tmp_path / "m", SMALL)
    model = AutoModelForCausalLM.from_pretrained(world.path)
    assert model.config.model_type == "qwen2" and model.config.num_hidden_layers == 2
    assert world.info["parameters"] == sum(p.numel() for p in model.parameters())
    assert (world.path / "edits.jsonl").read_text() == tiny_world.edits_path.read_text()
    assert "random-init qwen2-0.5b" in world.info["source"]
    again = make_scaled_world(tiny_world, "qwen2-0.5b", tmp_path / "m", SMALL)
    assert again.info.get("cached") and again.info["key"] == world.info["key"]
    with pytest.raises(UsageError, match="smaller than the world's tokenizer"):
        make_scaled_world(tiny_world, "qwen2-0.5b", tmp_path / "v", SMALL | {"vocab_size": "10"})


def test_scale_benchmark_measures_an_edit_on_the_random_model(tiny_world, tmp_path):
    argv = ["--world", str(tiny_world.path), "--edits", "2", "--methods", "ft-m", "--device", "cpu", "--dtype", "float32",
            "--models", str(tmp_path / "models"), "--out", str(tmp_path / "out"), "--quiet",
            *(item for key, value in SMALL.items() for item in ("--shape-set", f"{key}={value}"))]
    assert main(argv) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    (row,) = report["rows"]
    assert row["method"] == "ft-m" and row["by_count"][0]["edits"] == 2
    assert row["by_count"][0]["seconds_per_edit"] > 0 and row["memory"]["budget_mb"] > 0
    assert "random-init" in report["world"]["source"] and report["world"]["recall_reached"] is None
