"""A CPU host calibrated on first use, so that a plain `harness run` prints its prediction beside the measurement.

No dense peak is known for a CPU, so the shipped `system=cpu` profile cannot time a step. A profile that says
`auto_calibrate: true` (cpu.yaml does) is therefore measured once per host, rank count and torch version with
`harness calibrate` and kept in the user's config directory as `system=<name>-auto-n<ranks>`; later runs find it
there. The run's config then names that profile, so its run directory says what predicted it. Turn it off with
`system.auto_calibrate=false` or HARNESS_AUTO_CALIBRATE=0; sweeps (`-m`), `--dry-run`, `--cfg` and ranks that a
cluster launcher started (`launcher.join`) are never calibrated here.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Any, Optional

from omegaconf import OmegaConf

SKIP = ("-m", "--multirun", "--dry-run", "--cfg", "-c", "--info", "--hydra-help", "-h", "--help", "--resolve")


def auto_system(args: list[str]) -> list[str]:
    """`harness run`'s arguments, with `system=` pointing at this host's calibrated profile where the run's system
    asks for one (calibrating it first if there is none yet)."""
    if os.environ.get("HARNESS_AUTO_CALIBRATE") == "0" or any(a in SKIP or a.startswith("--cfg") for a in args):
        return args
    from harness.config.compose import compose, user_config_dir

    overrides = [a for a in args if "=" in a and not a.startswith(("-", "hydra."))]
    try:
        cfg = compose(overrides)
    except Exception:  # noqa: BLE001 - the run command reports a bad config in its own words
        return args
    system = cfg.system
    if not system.get("auto_calibrate") or system.device != "cpu" or system.peak_tflops is not None \
            or cfg.launcher.join:
        return args
    nproc = int(cfg.launcher.nproc)
    name = f"{system.name}-auto-n{nproc}"
    path = user_config_dir() / "system" / f"{name}.yaml"
    if not _current(path):
        print(f"harness: measuring this CPU host once for the prediction column ({nproc} rank(s), about 15 s; kept "
              f"as system={name} in {path.parent}; system.auto_calibrate=false skips it)", file=sys.stderr)
        from harness.predict.calibrate import calibrate_command

        threads = [f"launcher.omp_num_threads={cfg.launcher.omp_num_threads}"] if cfg.launcher.omp_num_threads else []
        with contextlib.redirect_stdout(sys.stderr):  # the run's stdout is its table (and a pipe's input) alone
            calibrate_command([f"system={system.name}", f"launcher.nproc={nproc}", *threads, f"--name={name}"])
    kept = [a for a in args if not a.startswith(("system=", "+system="))]
    return [*kept, f"system={name}"]


def _current(path: Any) -> Optional[bool]:
    """The cached profile exists and was measured here, with these cores and this torch, on a quiet host."""
    if not path.is_file():
        return False
    try:
        seen = OmegaConf.to_container(OmegaConf.load(path)).get("calibrated_on") or {}  # type: ignore[union-attr]
    except Exception:  # noqa: BLE001 - an unreadable cache is measured again
        return False
    from harness.predict.calibrate import host_identity

    identity = host_identity()
    return not seen.get("busy_host") and all(str(seen.get(key)) == str(value) for key, value in identity.items())
