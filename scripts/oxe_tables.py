"""Print how much of the original OpenVLA Open X-Embodiment tables we register.

python scripts/oxe_tables.py
-> datasets 70/70, transforms 60/60, mixtures 18/18 of the original's tables (plus ours: ...)
"""

from openvla_jax.data.oxe.upstream import coverage


def main() -> str:
    cov = coverage()
    counts = ", ".join(f"{table} {have}/{total}" for table, (have, total, _) in cov.items())
    extra = "; ".join(f"{table}: {', '.join(names)}" for table, (_, _, names) in cov.items() if names)
    line = f"{counts} of the original's tables (plus ours: {extra or 'none'})"
    print(line)
    return line


if __name__ == "__main__":
    main()
