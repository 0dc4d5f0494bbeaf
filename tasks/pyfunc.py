"""The MLflow pyfunc form of an edited model: ``mlflow.pyfunc.load_model(...).predict(prompts, params=...)``."""
from __future__ import annotations

from pathlib import Path

import mlflow.pyfunc
from mlflow.models import infer_signature

import kdpo
import tasks

MAX_NEW_TOKENS = 8
EXAMPLE = ["The capital of France is"]


class KnowledgeModel(mlflow.pyfunc.PythonModel):
    """Answers prompts with the edited Hugging Face model stored as the ``model_dir`` artifact: the greedy
    continuation of each prompt (``params={"max_new_tokens": N}``), cut at the end of its first sentence."""

    def load_context(self, context):
        from kdpo.modeling import load_model

        self.model, self.tokenizer = load_model(context.artifacts["model_dir"])

    def predict(self, context, model_input, params=None):
        from kdpo.evaluation import first_sentence, greedy_generate

        prompts = list(model_input.iloc[:, 0]) if hasattr(model_input, "iloc") else list(model_input)
        tokens = (params or {}).get("max_new_tokens", MAX_NEW_TOKENS)
        return [first_sentence(text) for text in greedy_generate(self.model, self.tokenizer, prompts, tokens)]


def requirements() -> list[str]:
    """What the pyfunc needs installed to load and answer (the project's own code travels as ``code_paths``)."""
    import torch
    import transformers

    return [f"mlflow=={mlflow.__version__}", f"torch=={torch.__version__.split('+')[0]}",
            f"transformers=={transformers.__version__}"]


def log_pyfunc(model_dir: str, name: str = "model") -> mlflow.models.model.ModelInfo:
    """Log ``model_dir`` as a :class:`KnowledgeModel` in the active run: a column of prompts in, answers out,
    ``max_new_tokens`` as a parameter, with an input example, requirements and the ``kdpo``/``tasks`` code."""
    signature = infer_signature(EXAMPLE, ["Paris"], params={"max_new_tokens": MAX_NEW_TOKENS})
    return mlflow.pyfunc.log_model(
        name=name, python_model=KnowledgeModel(), artifacts={"model_dir": model_dir}, signature=signature,
        input_example=EXAMPLE, pip_requirements=requirements(),
        code_paths=[str(Path(package.__file__).parent) for package in (kdpo, tasks)],
    )
