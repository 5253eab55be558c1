"""The shared conformance suite (SPEC §2, §5): cases, runner and reports.

`python -m rwkv_backends.conformance --backend NAME [--simulate PROFILE] [--interpret] [--quick]
[--report FILE.json] [--junit FILE.xml]`; the pytest suite in the repository's conformance/ folder
runs the same cases.
"""

from .cases import Case, full_cases, make_inputs, quick_cases, relative_error  # noqa: F401
