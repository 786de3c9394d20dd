"""Edison's benchmarks: stop latency (cancel -> `done`, cancel -> the model's CPU idle) in every
phase, recovery from wedged workers, throughput against llama-cpp-python in-process, memory,
and behaviour under load, with the seed's design and llama-cpp-python's server side by side.

Run with `python -m benchmarks` (full, under 30 minutes on 2 cores) or `--quick`.
"""

# Every published table uses Gemma 3 270M (the default bundled model until SmolLM2 135M
# Instruct took its place), so that the numbers stay comparable from one round to the next.
BENCH_MODEL = "gemma3-270m"
