"""The model worker process: its main loop, the generation engine and prompt formatting.

Imports llama_cpp (lazily, inside the process) and never starlette.
"""
