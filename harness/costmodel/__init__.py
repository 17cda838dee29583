"""Analytical cost model. Depends on nothing but the config (no torch at import)."""
