"""fuzzmmu: a coverage-guided differential fuzzer for x86 shadow paging."""

__version__ = "0.1.0"
