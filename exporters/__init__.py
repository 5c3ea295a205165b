"""Exporters: turn the reconciliation model's view into other systems' formats."""
