"""Experiments as code (issue 5): each script runs the real aggregator logic and writes CSV + PNG.

See docs/results.md for the commands and the recorded results.
"""
