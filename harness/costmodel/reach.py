"""How far a prediction reaches beyond what its calibrated profile was measured on.

A profile learned from one run (`harness calibrate --from`) or from the probe GEMMs records what it saw
(`system.calibrated_on`): rates measured at one width, on some number of ranks, hold less well far from there
(a GEMM's efficiency depends on its size; a collective over more ranks adds hops and crosses links it never
crossed). `harness estimate` prints each of these as a warning next to the prediction, not as an error.
"""

from __future__ import annotations

from typing import Any

WIDTH_FACTOR = 4.0
"""A model this many times wider or narrower than the calibrated one is extrapolated."""


def reach_warnings(cfg: Any, world_size: int) -> list[str]:
    """One line per way the prediction reaches outside the profile's calibration (none for a profile that says
    nothing of it, as the shipped ones from published measurements do)."""
    seen = dict(getattr(cfg.system, "calibrated_on", None) or {})
    if not seen:
        return []
    out = []
    for key, what in (("d_model", "model.d_model"), ("seq_len", "model.seq_len")):
        measured, asked = seen.get(key), getattr(cfg.model, key)
        if measured and not 1 / WIDTH_FACTOR <= asked / measured <= WIDTH_FACTOR:
            out.append(f"{what}={asked} is {max(asked / measured, measured / asked):.0f}x the {measured} that "
                       f"system={cfg.system.name} was calibrated on: its rates are extrapolated")
    ranks = seen.get("world_size")
    if ranks and world_size > ranks:
        out.append(f"{world_size} ranks, but system={cfg.system.name} measured collectives over {ranks}: "
                   "larger groups are extrapolated from its bandwidth and latency")
    return out
