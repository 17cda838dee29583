"""Finding this process's rank from whatever started it, and starting local ranks."""
