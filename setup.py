"""Builds the C++/Cython extension ``ktlab._kernels`` from ``ktlab/_kernels.pyx`` and ``cpp/*.cpp``.

SIMD code paths are compiled with per-function ``target`` attributes (not ``-march=native``),
so one binary loads on any x86-64 CPU and picks its best path at run time.
"""

import glob
import platform

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup

compile_args = ["-O3", "-std=c++17", "-fno-strict-aliasing", "-ffp-contract=off", "-Wno-unused-function"]
if platform.machine().lower() in ("x86_64", "amd64"):
    compile_args.append("-mno-avx")  # baseline stays portable; SIMD only inside target() functions

extension = Extension(
    "ktlab._kernels",
    sources=["ktlab/_kernels.pyx", *sorted(glob.glob("cpp/*.cpp"))],
    depends=sorted(glob.glob("cpp/*.h")),  # header edits rebuild the extension too
    include_dirs=["cpp", numpy.get_include()],
    language="c++",
    extra_compile_args=compile_args,
    extra_link_args=["-pthread"],
    define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
)

setup(ext_modules=cythonize([extension], language_level=3, compiler_directives={"boundscheck": False}))
