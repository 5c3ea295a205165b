"""Prometheus exporter (collector.py) plus the rules and dashboards shipped beside it."""
