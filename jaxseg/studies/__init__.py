"""Studies: several training runs driven as one command, each writing a table (see launch.py)."""
