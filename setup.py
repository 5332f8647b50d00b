# Only here to declare the cffi extension; all metadata lives in pyproject.toml.
from setuptools import setup

setup(cffi_modules=["flashattn_cupy/_build_cffi.py:ffibuilder"])
