"""The build: setup.cfg holds the metadata. Cython compiles the modules that have a .pxd
beside them (their types), from the same .py sources; where it cannot, they run
interpreted, and the master says so once."""
from Cython.Build import cythonize
from setuptools import Extension, setup

COMPILED = ["sniproxy.firstflight"]
# Written in C, with the same thing in Python beside it (userspace_relay.py's pairs)
IN_C = ["sniproxy.copypair"]

setup(ext_modules=cythonize(
    [Extension(name, [name.replace(".", "/") + ".py"], optional=True) for name in COMPILED],
    compiler_directives={"language_level": 3, "annotation_typing": False}) +
    [Extension(name, [name.replace(".", "/") + ".c"], optional=True) for name in IN_C])
