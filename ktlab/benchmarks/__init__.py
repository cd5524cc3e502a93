"""Benchmarks of ktlab's kernels on this machine (``ktlab bench-experts``).

:mod:`ktlab.benchmarks.machine` measures what the machine can do at best (read bandwidth,
compute peak per ISA path); :mod:`ktlab.benchmarks.experts` measures what the MoE expert
kernels do, side by side with torch and KTransformers' ``kt-kernel``.
"""
