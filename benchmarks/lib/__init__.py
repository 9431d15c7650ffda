"""What the benchmark scripts share.

* :mod:`.stats`: stats(), nearest-rank percentiles, latency summaries;
* :mod:`.output`: progress to stderr, tables, the JSON and PNG result files;
* :mod:`.host`: the machine (CPUs, load, other QEMU processes), memory guards;
* :mod:`.leaks`: what a run left behind (QEMU processes, mounts) and its removal;
* :mod:`.daemon`: one daemon process per phase (the pool benchmark's ``DaemonRun``);
* ``pool_*`` and ``template_*``: the phases, reports and plots of pool.py and
  template.py, which keep only their arguments, phase plan and ``main``.

The scripts put the repository root on ``sys.path`` and import this package as
``benchmarks.lib``.
"""
