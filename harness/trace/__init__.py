"""Where a step's time goes: a torch.profiler trace of a window of steps on every rank (`capture`), and
its breakdown into compute, communication, overlap and the rest of the step.

- `capture`: the profiler around the step loop, `profile/rank<k>.json.gz` per rank, the CUDA memory
  snapshot; steps it touched are marked in steps.jsonl.
- `events`: a Chrome trace read into plain records (what both analyses start from).
- `comm`: communication by collective kind (calls, bytes, time) from the trace's collective events,
  and the cost model's bytes for the same run.
- `cpu`: the CPU fallback breakdown from the profiler's own operator events (gloo runs, where no
  kernels exist); `gpu`: Holistic Trace Analysis on accelerator traces.
- `analyse`: each rank's trace into its breakdown, and every rank's into summary.json's `breakdown`
  and `profile` blocks.
"""
