"""Rating templates: user scripts with a rate(data) function, run in a sandbox."""
