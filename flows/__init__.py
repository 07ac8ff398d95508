"""Prefect flows of toa. `toa` (deployment `synthesize`) is the main one."""
