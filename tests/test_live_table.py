"""The result table a person reads: each long reason printed once, under the table."""

from __future__ import annotations

from rich.console import Console

from harness.run.live import RSS_NOTE, summary_table

REASON = "not measured: rank 0 on vm: no GPU, and RAPL is unavailable: no RAPL package domains"


def _summary(memory_kind: str) -> dict:  # type: ignore[type-arg]
    metrics = {"timed_steps": 3, "iter_time_ms": 10.0, "tokens_per_s": 100.0, "model_tflops_per_device": 0.01,
               "hardware_tflops_per_device": 0.01, "mfu": None, "mfu_reason": "no dense peak is known for a CPU",
               "hfu": None, "hfu_reason": "no dense peak is known for a CPU", "peak_memory_mb": 400.0,
               "peak_memory_kind": memory_kind, "loss": 6.2}
    metrics.update({f"{key}_reason": REASON for key in ("power_w", "idle_power_w", "energy_j_per_step",
                                                         "tokens_per_joule")})
    return {"metrics": metrics, "layout": {"world_size": 1, "dp": 1, "tp": 1, "pp": 1, "global_batch_size": 1,
                                           "micro_batch_size": 1, "grad_accum": 1},
            "model": {"name": "gpt-tiny", "params": 1}, "config": {"backend": {"name": "ddp"}},
            "prediction": {"iter_time_ms": 12.0, "peak_memory_mb": 4.0}}


def _render(summary: dict) -> tuple[str, list[str]]:  # type: ignore[type-arg]
    table, footnotes = summary_table(summary)
    console = Console(width=80, record=True)
    console.print(table)
    return console.export_text(), footnotes


def test_a_long_reason_is_one_footnote_referenced_by_each_row() -> None:
    text, footnotes = _render(_summary("cpu_peak_rss"))
    assert footnotes.count(REASON) == 1 and REASON not in text
    assert text.count(f"see ({footnotes.index(REASON) + 1})") == 4  # power, idle power, energy, tokens per joule
    assert "+20%" in text  # iteration time: predicted 12 ms against 10 ms measured


def test_cpu_rss_is_not_scored_against_predicted_device_memory() -> None:
    text, footnotes = _render(_summary("cpu_peak_rss"))
    assert RSS_NOTE in footnotes and "-99%" not in text
    text, _ = _render(_summary("cuda_max_allocated"))
    assert "-99%" in text  # a device allocator's peak is what the prediction models
