"""One benchmark run: `harness run`, from the checks before launch to the run directory."""
