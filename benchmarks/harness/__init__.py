"""The benchmarks' shared harness: what every scenario script (``benchmarks/bench_*.py``) builds on.

* :mod:`harness.measure`: the model saved (``BenchModel``), timing and memory (``PeakRSS``, round-robin
  ``run_rounds``, medians), the disk's own write + fsync, the command-line options the save scenarios share.
* :mod:`harness.training`: the training loop a save runs beside, and *lost training time per save*.
* :mod:`harness.savers`: the ways of saving compared (bgsave, sync ``torch.save``, DCP, Lightning and the
  copy / disk limits), each behind one small interface, ``Saver``.
* :mod:`harness.report`: the machine's facts, the scratch directory, and the results file, which
  always carries the git SHA and the machine (``write_report``).

The scripts run as ``python benchmarks/<script>.py``: Python puts ``benchmarks/`` on ``sys.path``, so
``import harness`` finds this package with nothing installed beyond bgsave and the ``bench`` extra.
Nothing here writes results on its own; each scenario calls ``write_report``.
"""
