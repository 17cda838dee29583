"""harness: train a GPT under a parallel layout, measure it, predict it, compare."""

__version__ = "0.1.0"
DISTRIBUTION = "gpt-train-harness"
"""The name pip knows the project by (a bare `harness` on the package index is somebody else's project); the
import name and the command stay `harness`."""
