"""Finding this process's rank from whatever started it, starting local ranks, and rendering batch job scripts."""
