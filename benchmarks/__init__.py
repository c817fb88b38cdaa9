"""The benchmarks: each prints a ratio against a baseline measured in the same run.

Run from the repository root as modules (``python -m benchmarks.bench_overhead``,
``python -m benchmarks.bench_trainer_step``, ``python -m benchmarks.bench_cuda``; ``make
bench`` runs the first two). The parameter sets they time are in :mod:`benchmarks.shapes`,
which they import; no benchmark imports another, except ``bench_overhead --device cuda``,
which hands over to ``bench_cuda``.
"""
