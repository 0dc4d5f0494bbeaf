"""Finding the linear modules an edit changes, in any Hugging Face causal LM (Llama's Linear, GPT-2's Conv1D)."""
from __future__ import annotations

import torch


def find_module(model: torch.nn.Module, name: str) -> torch.nn.Module:
    """The module whose qualified name ends with ``name``; a clear error if none or several do."""
    matches = [(full, module) for full, module in model.named_modules() if full == name or full.endswith("." + name)]
    if len(matches) != 1:
        examples = [full for full, module in model.named_modules() if full.endswith(("down_proj", "c_proj"))][:4]
        what = "no module" if not matches else f"{len(matches)} modules"
        raise ValueError(f"{what} named {name!r} in this model; edit a linear layer such as {examples}")
    module = matches[0][1]
    if getattr(module, "weight", None) is None or module.weight.dim() != 2:
        raise ValueError(f"module {name!r} has no 2-d weight; edit a linear layer")
    return module


def input_output_dims(module: torch.nn.Module) -> tuple[int, int]:
    """(in, out) features of a linear module (nn.Linear or GPT-2's Conv1D)."""
    if isinstance(module, torch.nn.Linear):
        return module.in_features, module.out_features
    return module.weight.shape[0], module.weight.shape[1]  # GPT-2's Conv1D stores (in, out)
