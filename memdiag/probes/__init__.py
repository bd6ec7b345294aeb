"""Probes read one figure fast. Each is a pure parser plus a thin reader naming its source."""
