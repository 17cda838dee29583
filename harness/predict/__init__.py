"""Predicting before running: one module per command (`estimate`, `plan`, `calibrate`)."""
