"""Per-group kernel benchmarks; each module exposes run(device) -> list[Row]."""
