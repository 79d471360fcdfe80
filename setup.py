"""Build script: the pure-Python package plus the optional C++/CUDA extension `trust_fast._C`.

The extension is optional: without a compiler (or without torch's build helpers) the package
installs and runs on its pure-PyTorch reference backend.
"""
from __future__ import annotations

import os

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def build_extensions() -> tuple[list, dict]:
    """(ext_modules, cmdclass) for trust_fast._C; empty when torch's extension helpers are unavailable.

    CPU kernels (csrc/*.cpp, OpenMP) always; CUDA kernels (csrc/cuda/*.cu) too when
    torch was built with CUDA and nvcc is found (TORCH_CUDA_ARCH_LIST picks the
    architectures).  A failed compile only skips the extension: the package then
    builds the kernels at first use (JIT) or runs on the reference backend.
    ``TRUST_FAST_NO_EXT=1`` skips the extension altogether.
    """
    import glob

    if os.environ.get("TRUST_FAST_NO_EXT", "") not in ("", "0"):
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        return [], {}

    csrc = os.path.join(HERE, "csrc")
    sources = sorted(glob.glob(os.path.join(csrc, "*.cpp")))
    if not sources:
        return [], {}
    sources = [os.path.relpath(s, HERE) for s in sources]
    cxx_flags = ["-O3", "-fno-math-errno", "-fopenmp"]
    with_cuda = bool(torch.version.cuda) and cpp_extension.CUDA_HOME is not None
    if with_cuda:
        cuda_dir = os.path.join(csrc, "cuda")
        for pattern in ("*.cu", "*.cpp"):
            sources += sorted(os.path.relpath(s, HERE) for s in glob.glob(os.path.join(cuda_dir, pattern)))
        ext = cpp_extension.CUDAExtension(
            "trust_fast._C",
            sources,
            include_dirs=[csrc],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "--use_fast_math"]},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = cpp_extension.CppExtension(
            "trust_fast._C", sources, include_dirs=[csrc], extra_compile_args=cxx_flags, extra_link_args=["-fopenmp"]
        )

    class OptionalBuildExtension(cpp_extension.BuildExtension):
        """Build trust_fast._C, but let the install succeed without it."""

        failed: set = set()

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as exc:  # no compiler, broken toolchain: fall back at run time
                self.failed.add(ext.name)
                print(f"WARNING: trust_fast._C was not built ({type(exc).__name__}: {exc}); "
                      "trust_fast will try a JIT build at first use, else use its reference backend")

        def _built_only(self, method, *args):
            every = self.extensions
            self.extensions = [e for e in every if e.name not in self.failed]
            try:
                return method(*args)
            finally:
                self.extensions = every

        def copy_extensions_to_source(self):
            return self._built_only(super().copy_extensions_to_source)

        def get_outputs(self):
            return self._built_only(super().get_outputs)

    return [ext], {"build_ext": OptionalBuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = build_extensions()

setup(
    packages=find_packages(include=["trust_fast", "trust_fast.*"]) + ["trust_fast.kernels"],
    package_dir={"trust_fast.kernels": "triton_kernels"},
    package_data={"trust_fast": ["assets/*.safetensors", "assets/*.json", "assets/shapes/*.json",
                                 "assets/shapes/*/*"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
