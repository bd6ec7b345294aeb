import pytest

from memdiag.errors import UsageError
from memdiag.units import format_bytes, parse_size


@pytest.mark.parametrize(
    "text, expected",
    [
        ("500G", 500 * 2**30),
        ("500GiB", 500 * 2**30),
        ("64GB", 64 * 10**9),
        ("1.5T", int(1.5 * 2**40)),
        ("256M", 256 * 2**20),
        ("4096", 4096),
        ("12 KiB", 12 * 1024),
        (1024, 1024),
    ],
)
def test_parse_size_forms(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["500X", "G", "-5G", "five", "", "1e9"])
def test_parse_size_rejects_with_the_token(text):
    with pytest.raises(UsageError) as err:
        parse_size(text, name="host_ram")
    assert "host_ram" in str(err.value)
    assert "500G" in str(err.value)  # says which forms are accepted


def test_negative_number_rejected():
    with pytest.raises(UsageError, match="negative"):
        parse_size(-1, name="host_ram")


def test_format_bytes():
    assert format_bytes(3 * 2**30) == "3.00 GiB"
    assert format_bytes(1536) == "1.50 KiB"
    assert format_bytes(512) == "512 B"
    assert format_bytes(2 * 2**40) == "2.00 TiB"
    assert format_bytes(None) == "n/a"
