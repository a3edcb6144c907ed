"""Ray entry points, one module per job, each run as `python -m jobs.<name>`."""
