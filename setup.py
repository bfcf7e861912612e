"""The compiled token-span scanner, built when a C compiler is present.

Everything else is in pyproject.toml. ``optional=True``: without a compiler (or if the
build fails) the package installs without the scanner and the collector decodes token
spans in pure Python, to the same rows (collector/ingest/tokenspans.py).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "tokentrace.collector.ingest._tokenscan",
            ["collector/ingest/_tokenscan.c"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Werror=implicit-function-declaration"],
            optional=True,
        )
    ]
)
