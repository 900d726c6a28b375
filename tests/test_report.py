"""The closing table's line on run-to-run spread."""

from jobs.report import spread_line


def test_spread_line_gives_the_sampling_error_and_the_measured_seed_spread():
    # R@1 10 % over 900 queries: sqrt(0.1 * 0.9 / 900) = 1.0 point
    assert spread_line(10.0, 900, None) == "Expected run-to-run spread of R@1: ±1.0 from sampling 900 test queries"
    line = spread_line(10.0, 900, 1.5)
    assert "±1.5 seed to seed" in line and "a difference under 3.0 is noise" in line
    assert spread_line(0.0, 10, None).startswith("Expected run-to-run spread of R@1: ±0.0")
