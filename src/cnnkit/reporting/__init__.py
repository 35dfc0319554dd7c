"""``cnnkit report``: one self-contained ``report.html`` that says whether training worked.

``build`` gathers the run and writes the page, ``sections`` draws each section, ``verdict``
holds the statistics behind its judgements (did it learn, where are the curves going).
"""

from cnnkit.reporting.build import (
    DATA_SECTIONS,
    SECTIONS,
    build_report,
    try_write_report,
    write_report,
)

__all__ = ["DATA_SECTIONS", "SECTIONS", "build_report", "try_write_report", "write_report"]
