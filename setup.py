"""Build script: the pure-Python package plus the optional C++/CUDA extension `trust_fast._C`.

The extension is optional: without a compiler (or without torch's build helpers) the package
installs and runs on its pure-PyTorch reference backend.
"""
from __future__ import annotations

import os

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def build_extensions() -> tuple[list, dict]:
    """(ext_modules, cmdclass) for trust_fast._C; empty when torch's extension helpers are unavailable."""
    return [], {}


ext_modules, cmdclass = build_extensions()

setup(
    packages=find_packages(include=["trust_fast", "trust_fast.*"]) + ["trust_fast.kernels"],
    package_dir={"trust_fast.kernels": "kernels"},
    package_data={"trust_fast": ["assets/*.safetensors", "assets/*.json", "assets/shapes/*.json",
                                 "assets/shapes/*/*"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
