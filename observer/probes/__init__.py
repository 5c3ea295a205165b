"""Probe catalog, BPF loading in fentry/kprobe/tracepoint modes, and event decoding."""
