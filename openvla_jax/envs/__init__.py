"""Environments for closed-loop evaluation: the bundled tabletop demo task (`tabletop.py`) and
LIBERO with OpenVLA's protocol in spawned simulator workers (`libero.py`; the `libero` extra)."""
