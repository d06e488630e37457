"""Evaluation of a policy.

- `closed_loop`: episodes of the demo tabletop env driven by a policy, beside the scripted expert.
- `offline`: greedy decoding on a dataset's frames against its actions (per-dimension L1 / MSE).
- `filmstrip` / `report`: pictures and tables of those results.
"""
