"""Benchmark commands: ``python -m tools.bench estargz`` and ``python -m tools.bench image``.

They print the tables of ``docs/benchmarks.md``. Nothing here is a test: no figure makes
anything pass or fail. The package's own import stays empty because the TOC probe
subprocess (``tools.bench._probe``) imports it and must weigh no more than blockfs does.
"""
