"""`harness report`: run directories into one pandas DataFrame, then the studies' views (tables and plots).

Importing this package is cheap (no pandas); the views are named in harness.core.registry.REPORT_VIEWS and built
in `harness.report.views` and `harness.report.plots`.
"""
