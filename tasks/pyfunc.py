"""The MLflow pyfunc form of an edited model: ``mlflow.pyfunc.load_model(...).predict(prompts)``."""
from __future__ import annotations

import mlflow.pyfunc


class KnowledgeModel(mlflow.pyfunc.PythonModel):
    """Answers prompts with the edited Hugging Face model stored as the ``model_dir`` artifact."""

    def load_context(self, context):
        from kdpo.modeling import load_model

        self.model, self.tokenizer = load_model(context.artifacts["model_dir"])

    def predict(self, context, model_input, params=None):
        from kdpo.evaluation import greedy_generate

        prompts = list(model_input["prompt"]) if hasattr(model_input, "columns") else list(model_input)
        return greedy_generate(self.model, self.tokenizer, prompts, max_new_tokens=(params or {}).get("max_new_tokens", 8))
