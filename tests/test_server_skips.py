"""A server test that cannot run is never silent (tests/conftest.py): its skip is counted in a red
"servers" section of the summary, and with CELLSEG_REQUIRE_SERVICES=1 (CI) it fails."""

from __future__ import annotations

from pathlib import Path

pytest_plugins = ["pytester"]

TESTS = '''
import pytest

@pytest.fixture
def postgres_url():
    pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not found (simulated)")

def test_needs_postgres(postgres_url):
    pass

def test_skips_for_another_reason():
    pytest.skip("unrelated")

def test_plain():
    pass
'''


def run(pytester, monkeypatch, required: bool):
    pytester.makeconftest(Path(__file__).with_name("conftest.py").read_text())
    pytester.makepyfile(test_fake_servers=TESTS)
    if required:
        monkeypatch.setenv("CELLSEG_REQUIRE_SERVICES", "1")
    else:
        monkeypatch.delenv("CELLSEG_REQUIRE_SERVICES", raising=False)
    return pytester.runpytest_inprocess("-p", "no:randomly", "-p", "no:cacheprovider")


def test_a_skipped_server_test_is_counted_in_the_summary(pytester, monkeypatch):
    result = run(pytester, monkeypatch, required=False)
    result.assert_outcomes(passed=1, skipped=2)
    result.stdout.fnmatch_lines(["*! servers !*", "1 server test(s) SKIPPED, not run*",
                                 "*PostgreSQL server binaries*(simulated)"])
    assert result.ret == 0


def test_required_servers_turn_the_skip_into_a_failure(pytester, monkeypatch):
    result = run(pytester, monkeypatch, required=True)
    result.assert_outcomes(passed=1, skipped=1, errors=1)
    result.stdout.fnmatch_lines(["*CELLSEG_REQUIRE_SERVICES=1 but this test's server could not start*"])
    assert "server test(s) SKIPPED" not in result.stdout.str()
    assert result.ret != 0
