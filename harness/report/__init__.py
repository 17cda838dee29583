"""`harness report`: run directories into one pandas DataFrame, then the studies' views (tables and plots).

Importing this package is cheap (no pandas); the views live in `harness.report.views`.
"""

VIEWS = ("sweep", "compare", "scaling", "prediction", "power", "projection", "breakdown", "comm")
"""The views `harness report --view` and an experiment's `report.views` may name, in report order."""
