"""Analysis of run directories: the code the figure, table and benchmark scripts share.

Plain Python on the files a run leaves (``config.yaml``, ``metrics.jsonl``, ``summary.json``)
and on the tidy tables of ``experiments/``; no Hydra, no printing (``logging`` only). The
numerical packages (:mod:`shine.solvers`, :mod:`shine.backward`, :mod:`shine.deq`,
:mod:`shine.bilevel`, :mod:`shine.models`) never import it.

* :mod:`shine.analysis.methods` - the one registry of method labels, colours, markers, families.
* :mod:`shine.analysis.style` - the plotting style and the reproducible ``save`` of figures.
* :mod:`shine.analysis.tables` - CSV cells and text, atomic writes, durations as text.
* :mod:`shine.analysis.time_to_target` - time to come within 1 % / 0.1 % of the best loss.
* :mod:`shine.analysis.bilevel_results` - bi-level figure specs, curves and ``summary.csv``.
* :mod:`shine.analysis.deq_results` - DEQ rows of the collection, the paper's numbers,
  Fig. 3 / E.3 summaries.
* :mod:`shine.analysis.bench` - interleaved rounds, per-round ratios, targets of the benchmarks.
* :mod:`shine.analysis.bench_models` - the MDEQ-like block of the core benchmark.

The submodules are imported on demand (``style`` loads matplotlib, ``bench`` loads torch).
"""
