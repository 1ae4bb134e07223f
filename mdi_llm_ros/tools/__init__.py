"""Operator tools around a running ring: benchmark, soak, demo, emulated devices, status watching."""
