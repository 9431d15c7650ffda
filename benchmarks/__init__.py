"""The benchmarks (run as ``python benchmarks/NAME.py``) and their shared library."""
