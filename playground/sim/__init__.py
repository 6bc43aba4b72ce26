"""Simulated annotators: gold functions, the annotator, the simulator and the autopilot service."""
