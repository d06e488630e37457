"""Environments for closed-loop evaluation: the bundled tabletop demo task (`tabletop.py`)."""
