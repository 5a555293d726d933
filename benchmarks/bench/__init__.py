"""The benchmark harness behind ``allocation_bench.py``, one job per module, and the helpers every benchmark script
shares. Imports only go down this list (a module imports those above it, never below):

- ``common``: run metadata, resource probes, adapter introspection, Trainer callbacks (shared with overhead.py);
  ``data``: GLUE files and splits; ``metrics``: GLUE metrics; ``models``: local pretrained models (shared with
  finetune.py); ``transforms``: text rewritings; ``family``: the planted family's members.
- ``suites``: ``Suite`` and the ``SUITES`` registry (model, data, budget, schedule of each benchmark).
- ``records``: the results tree, one JSON per (suite, method, seed): paths and reading.
- ``tasks``: data, model, loss, evaluation and validation per task family (``planted``, ``clm``, ``glue``,
  ``distill``).
- ``methods``: method names (``parse_method``), learning rates and how each wraps a model (``build``), with the rank
  helpers; ``peers``: PEFT's AdaLoRA and EVA and full fine-tuning in the hand loop.
- ``runner``: one run (``run_one``), the worker process, and the driver that runs the missing ones.
- ``stats``: paired differences, t intervals, verdicts, Fieller's interval.
- the report: ``tables`` (shared helpers), ``overview`` (calibrations, peers side by side, ``summary.md``),
  ``tuning`` (each method at its own learning rate), ``family_report``, ``cost_table``, ``plots`` (the forest plot)
  and ``report`` (``report.md``).

Scripts put ``benchmarks/`` on ``sys.path`` and import ``bench.<module>``.
"""
