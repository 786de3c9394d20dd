"""Edison's benchmarks: stop latency (cancel -> `done`, cancel -> the model's CPU idle) in every
phase, recovery from wedged workers, throughput against llama-cpp-python in-process, memory,
and behaviour under load, with the seed's design and llama-cpp-python's server side by side.

Run with `python -m benchmarks` (full, under 30 minutes on 2 cores) or `--quick`.
"""
