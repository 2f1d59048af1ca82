"""Test, benchmark and demo support, kept apart from the pipeline's own code: the synthetic
catalog (garment packshots of known category and colour, feeds in every format), its loopback
image server with fault routes, and helpers that start flickd's processes for tests and benches.

Only the top of the house imports it: the demo command, the tests and the benchmarks.
"""
