"""kdpo-refresh: keep a language model's factual knowledge current by editing it (KDPO and baselines)."""
from kdpo.requests import EditRequest, PromptAnswer

__version__ = "0.1.0"
__all__ = ["EditRequest", "PromptAnswer", "__version__"]
