"""Builds the optional C++ helpers in csrc/ as unimrg_fast._native.

The extension is optional: when it cannot be compiled (no compiler, offline build
without pybind11) the package still installs and unimrg_fast.packing falls back to
its numpy twins, which compute identical results.
"""
from setuptools import setup

try:
    from pybind11.setup_helpers import Pybind11Extension, build_ext
except ImportError:  # offline `pip install --no-build-isolation` without pybind11
    ext_modules, cmdclass = [], {}
else:
    ext_modules = [
        Pybind11Extension(
            "unimrg_fast._native",
            ["csrc/native.cpp"],
            cxx_std=17,
            extra_compile_args=["-O3"],
            optional=True,
        )
    ]
    cmdclass = {"build_ext": build_ext}

setup(ext_modules=ext_modules, cmdclass=cmdclass)
