"""What Edison is compared with, as runnable programs: the seed's one-process design and a
plain in-process llama-cpp-python loop (the throughput reference)."""
