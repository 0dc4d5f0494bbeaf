"""Key statistics for null-space protection, for any model: K0^T K0 of each edited module's inputs over a
corpus the model knows.

For a project world the corpus is its own training text (``corpus.txt``); for any other model it is a text
file or data set the user names, sampled to a budget. The statistics are computed once and cached on disk
(``$KDPO_HOME/keystats/KEY.pt``), keyed by the model's weights, the module names and the corpus.
"""
from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kdpo.config import ConfigError
from kdpo.modeling import chunks

TABLE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")


def read_corpus(source: str | Path, budget: int | None = None, seed: int = 0, text_field: str = "text") -> list[str]:
    """Passages from ``source``, a seeded sample of at most ``budget`` of them.

    ``source`` is a text file (one passage a line), a JSONL/JSON/Parquet/CSV table with a ``text_field``
    column (read with polars), a directory written by ``datasets.Dataset.save_to_disk``, or
    ``hf:NAME[:CONFIG]`` for a Hugging Face hub data set's train split (needs network).
    """
    source = str(source)
    if source.startswith("hf:"):
        import datasets

        name, _, subset = source[3:].partition(":")
        texts = datasets.load_dataset(name, subset or None, split="train")[text_field]
    else:
        path = Path(source)
        if not path.exists():
            raise ConfigError(f"protection corpus {source}: no such file or directory")
        if path.is_dir():
            import datasets

            texts = datasets.load_from_disk(str(path))[text_field]
        elif path.suffix in TABLE_SUFFIXES:
            texts = _table_column(path, text_field)
        else:
            texts = path.read_text().splitlines()
    texts = [text for text in texts if text and text.strip()]
    if not texts:
        raise ConfigError(f"protection corpus {source} is empty (no non-blank passage)")
    if budget is not None and len(texts) > budget:
        texts = random.Random(seed).sample(texts, budget)
    return texts


def _table_column(path: Path, column: str) -> list[str]:
    import polars as pl

    readers = {".jsonl": pl.read_ndjson, ".json": pl.read_json, ".parquet": pl.read_parquet, ".csv": pl.read_csv}
    try:
        frame = readers[path.suffix](path)
    except Exception as error:  # polars raises many error types for malformed files
        raise ConfigError(f"protection corpus {path}: cannot read it as {path.suffix[1:]}: {error}") from error
    if column not in frame.columns:
        raise ConfigError(f"protection corpus {path}: no column {column!r} (columns: {frame.columns})")
    return [str(text) for text in frame[column].drop_nulls().to_list()]


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 of every parameter and buffer of ``model`` (names, shapes, dtypes and bytes)."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def keystats_root() -> Path:
    """``$KDPO_HOME/keystats`` (default ``~/.cache/kdpo/keystats``)."""
    return Path(os.environ.get("KDPO_HOME", Path.home() / ".cache" / "kdpo")) / "keystats"


def key_covariances(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, module_names: list[str], corpus: list[str],
    batch_size: int = 64, max_length: int = 256, cache: bool = True, progress: bool = False,
) -> list[torch.Tensor]:
    """K0^T K0 (float32, [in, in]) of each named module's inputs at every non-pad position of ``corpus``,
    read from the on-disk cache when the same weights, modules and corpus were seen before."""
    from kdpo.editors.base import module_inputs
    from kdpo.layers import find_module, input_output_dims

    modules = [find_module(model, name) for name in module_names]
    digest = hashlib.sha256(weights_digest(model).encode())
    digest.update(repr((list(module_names), max_length)).encode())
    digest.update("\n".join(corpus).encode())
    path = keystats_root() / f"{digest.hexdigest()[:24]}.pt"
    device = next(model.parameters()).device
    if cache and path.exists():
        return [c.to(device) for c in torch.load(path, weights_only=True)["covariances"]]

    covariances = [torch.zeros(input_output_dims(m)[0], input_output_dims(m)[0], device=device) for m in modules]
    batches = list(chunks(corpus, batch_size))
    with torch.no_grad():
        for batch_texts in tqdm(batches, desc="key statistics", disable=not progress, unit="batch"):
            encoded = tokenizer(batch_texts, return_tensors="pt", padding=True, truncation=True, max_length=max_length)
            encoded = encoded.to(device)
            mask = encoded["attention_mask"].bool()
            for covariance, inputs in zip(covariances, module_inputs(model, modules, encoded["input_ids"], mask)):
                keys = inputs[mask].float()
                covariance += keys.T @ keys
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = path.with_suffix(f".{os.getpid()}.tmp")
        torch.save({"covariances": [c.cpu() for c in covariances], "modules": list(module_names),
                    "passages": len(corpus)}, staging)
        staging.replace(path)
    return covariances
