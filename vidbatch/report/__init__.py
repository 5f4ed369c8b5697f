"""The run summary (`OUT/summary.json`) and the self-contained HTML report (`OUT/report.html`)."""

from vidbatch.report.page import write_report

__all__ = ["write_report"]
