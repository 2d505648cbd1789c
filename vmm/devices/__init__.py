"""Emulated devices, one small module each (kvmtool style).

Each device handles its port range for the vCPU threads and implements
save() -> message / restore(message) for its state.
"""
