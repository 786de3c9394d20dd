"""The HTTP layer: the composition root, both APIs' routes, validation, SSE, auth and /metrics.

Imports starlette and never llama_cpp: the web process never loads libllama (tests/test_layers.py).
"""
