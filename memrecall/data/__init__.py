"""Tasks, benchmarks, metrics and dataset builders (see `example.Example` for the common format)."""
