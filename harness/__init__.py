"""harness: train a GPT under a parallel layout, measure it, predict it, compare."""

__version__ = "0.1.0"


def quiet_library_warnings() -> None:
    """Not the user's to act on, and repeated every step or import: DeepSpeed still calls collectives torch
    has renamed, and megatron-core notes that its optional fused kernels (TE, Apex) are not installed."""
    import warnings

    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed", category=UserWarning)
