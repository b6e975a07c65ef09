"""`gridlab report`: results database → recommendation tables and crossover plots as HTML and PDF."""

from gridlab.report.render import build_report

__all__ = ["build_report"]
