"""The benchmark package: the helpers the benchmark scripts share (``common``, ``data``, ``metrics``, ``models``).

Scripts put ``benchmarks/`` on ``sys.path`` and import ``bench.<module>``.
"""
