"""Synthetic sample datasets for the sample jobs, generated from a seed."""
