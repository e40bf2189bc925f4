"""Benchmarks and tuners, off the product path: they build models and time kernels, and pass their choices to the
product as arguments; they never rewrite the product's module state."""
