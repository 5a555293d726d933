"""The benchmark harness behind ``allocation_bench.py``, one job per module, and the helpers every benchmark script
shares. Imports only go down this list (a module imports those above it, never below):

- ``common``: run metadata, resource probes, adapter introspection, Trainer callbacks (shared with glue*.py,
  overhead.py); ``data``: GLUE files and splits; ``metrics``: GLUE metrics; ``models``: local pretrained models.
- ``suites``: ``Suite`` and the ``SUITES`` registry (model, data, budget, schedule of each benchmark).
- ``records``: the results tree, one JSON per (suite, method, seed): paths and reading.
- ``tasks``: data, model, loss and evaluation per task family (``planted``, ``clm``, ``glue``, ``distill``).
- ``methods``: method names (``parse_method``) and how each wraps a model (``build``), with the rank helpers.
- ``runner``: one run (``run_one``), the worker process, and the driver that runs the missing ones.
- ``stats``: paired differences, t intervals, verdicts; ``report``: ``report.md`` from the results tree.

Scripts put ``benchmarks/`` on ``sys.path`` and import ``bench.<module>``.
"""
