"""GPT model package: the torch-free shape (`models.config`) and the model (`models.gpt`)."""

from .config import GPTConfig

__all__ = ["GPTConfig"]
