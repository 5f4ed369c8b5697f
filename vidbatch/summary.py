"""Moved to `vidbatch.report.summary`; this name stays until its last importer follows."""

from vidbatch.report.summary import build_summary, print_summary, write_summary

__all__ = ["build_summary", "print_summary", "write_summary"]
