"""ltdist: distributed long-tailed image recognition (KT and MPCL + MPFA).

Importing the package is cheap and works without the compiled extension; ops that need
``ltdist._C`` call :func:`ltdist.extension.load_extension`, which explains how to build it.
"""

__version__ = "0.1.0"
