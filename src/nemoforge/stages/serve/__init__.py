"""serve: the final model on stock vLLM's OpenAI server, queried once with reasoning on and once off."""

from nemoforge.stages.serve.stage import run

__all__ = ["run"]
