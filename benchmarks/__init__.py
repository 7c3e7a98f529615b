"""nanostream benchmark suite: ``python -m benchmarks`` (see benchmarks/README.md).

Kept import-light on purpose: W4 runs ``python -m benchmarks.w4_memory`` in fresh
subprocesses and measures their peak RSS.
"""
