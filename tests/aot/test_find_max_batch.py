"""The guided search for the largest batch that fits, on a fake compiler (no runtime needed)."""

import pytest

from openvla_jax.aot.compile import Report, find_max_batch, linear_estimate, refused_peak

GIB = 2**30


def fake_compiler(base: float, per_row: float, memory: float, tpu: bool):
    """peak = base + per_row * b GiB; a TPU refuses above memory quoting what it needed, a GPU reports."""
    tried = []

    def compile_at(b):
        tried.append(b)
        peak = int((base + per_row * b) * GIB)
        fits = peak <= memory * GIB
        r = Report("t", "p", 1, "k", int(memory * GIB), b, b, fits)
        if tpu and not fits:
            used = f"Used {peak / GIB:.2f}G of {memory}G hbm."
            r.error = f"RESOURCE_EXHAUSTED: Ran out of memory in memory space hbm. {used}"
        else:
            r.temp = peak
        return r

    return compile_at, tried


@pytest.mark.parametrize("tpu", [True, False])
@pytest.mark.parametrize("base,per_row,memory,start", [(5.1, 0.31, 95, 8), (30.0, 0.2, 80, 1), (2.0, 1.0, 16, 4)])
def test_finds_the_exact_edge_in_few_compiles(tpu, base, per_row, memory, start):
    compile_at, tried = fake_compiler(base, per_row, memory, tpu)
    best, reports = find_max_batch(compile_at, start=start)
    expected = max(b for b in range(1, 5000) if base + per_row * b <= memory)
    assert best == expected
    assert len(reports) == len(tried) <= 6, tried  # plain doubling + bisection took 12 for the first case


def test_nothing_fits_and_limit():
    compile_at, _ = fake_compiler(100.0, 1.0, 95, tpu=True)
    assert find_max_batch(compile_at, start=1)[0] == 0
    compile_at, tried = fake_compiler(0.0, 0.001, 95, tpu=False)
    best, _ = find_max_batch(compile_at, start=1, limit=64)
    assert best == 64 and max(tried) == 64


def test_bends_back_to_bisection_when_the_line_is_wrong():
    """Peak jumps (a rematerialisation choice changes) above 100 rows: still the exact edge."""

    def compile_at(b):
        peak = (10 + 0.1 * b + (40 if b > 100 else 0)) * GIB
        fits = peak <= 64 * GIB
        r = Report("t", "p", 1, "k", 64 * GIB, b, b, fits)
        r.temp = int(peak)
        return r

    best, reports = find_max_batch(compile_at, start=8)
    assert best == 140 and len(reports) <= 16


def test_refused_peak_and_estimate():
    assert refused_peak("Ran out of memory in memory space hbm. Used 16.98G of 15.75G hbm.") == int(16.98 * GIB)
    assert refused_peak("some other error") is None
    assert linear_estimate([(8, 10 * GIB), (16, 12 * GIB)], 20 * GIB) == 48
    assert linear_estimate([(8, 10 * GIB)], 20 * GIB) is None
