"""Prefect tasks of the toa flow: each does one thing and delegates the work to plain-Python
modules in toa/ (servers, prompts, engine, datasets, db)."""
