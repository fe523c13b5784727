"""The paper report (Bansal et al. 2023): :func:`build_report` computes every result it needs
through the result store and renders figures, tables, ``report.md`` and ``report.html``."""

from mechicl.report.build import (
    REPORT,
    Report,
    ReportConfig,
    build_report,
    render_report,
    report_jobs,
)
from mechicl.report.compare import Comparison, compare_reports

__all__ = ["REPORT", "Comparison", "Report", "ReportConfig", "build_report", "compare_reports",
           "render_report", "report_jobs"]
