"""fuzzmmu: a coverage-guided differential fuzzer for x86 shadow paging."""

import os as _os

__version__ = "0.1.0"

# The compiled model (fuzzmmu.native) must be in place before any of its modules is imported,
# and every fuzzmmu import passes here first.
if _os.environ.get("FUZZMMU_NATIVE") == "1":
    from fuzzmmu import native as _native

    _native.activate()
