"""Experiments that combine capture, probes and interventions (the only part of interp that may use probes)."""
