"""hvo-observer: live observer for HugeTLB Vmemmap Optimization (HVO)."""

__version__ = "0.1.0"
