"""PyTorch reference implementations, driven by the faithfulness benchmarks.

Everything here imports ``torch`` lazily; install the references with the
``reference`` extra (see benchmarks/README.md, "Faithfulness").
"""
