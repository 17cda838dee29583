"""harness: train a GPT under a parallel layout, measure it, predict it, compare."""

__version__ = "0.1.0"
