"""The one compiled piece: the abort callback (edison/worker/abort.c), a plain shared object
loaded with ctypes (no Python.h needed). Everything else is in pyproject.toml."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("edison.worker._abort", ["edison/worker/abort.c"], extra_compile_args=["-O2"])])
