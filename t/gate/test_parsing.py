"""Shortcuts in the per-session parsing (issue 27) give what the long way gives."""

import ipaddress

from hypothesis import given, settings, strategies as st

from smtpgate import address, net


def outcome(f, arg):
    try:
        return f(arg)
    except address.AddressError as e:
        return ("error", e.args)


@settings(max_examples=3000, deadline=None)
@given(st.text(alphabet='<>" @ab\\.=', max_size=14), st.booleans())
def test_split_path_shortcut_is_the_scan(text, bracket):
    arg = "<" + text if bracket else text
    assert outcome(address.split_path, arg) == outcome(address.scan_path, arg)


def test_split_path_usual_forms():
    assert address.split_path("<a@b.example>") == ("<a@b.example>", "")
    assert address.split_path("<a@b.example> SIZE=10  BODY=8BITMIME ") == \
        ("<a@b.example>", "SIZE=10  BODY=8BITMIME")
    assert address.split_path("<a@b>x y") == ("<a@b>x", "y")        # the scan's answer


def test_normalize_ip_keeps_a_bounded_table(monkeypatch):
    monkeypatch.setattr(net, "PARSED", {})
    monkeypatch.setattr(net, "PARSED_MAX", 4)
    assert net.normalize_ip("::ffff:192.0.2.1") == ipaddress.ip_address("192.0.2.1")
    assert net.normalize_ip("::ffff:192.0.2.1") == ipaddress.ip_address("192.0.2.1")
    assert net.normalize_ip("2001:db8::1").version == 6
    for i in range(10):
        assert net.normalize_ip("192.0.2.%d" % i) == ipaddress.ip_address("192.0.2.%d" % i)
        assert len(net.PARSED) <= 4
    assert net.normalize_ip(None) is None and net.normalize_ip("") is None
    assert net.normalize_ip(ipaddress.ip_address("::ffff:10.0.0.1")) == \
        ipaddress.ip_address("10.0.0.1")
    try:
        net.normalize_ip("not an address")
    except ValueError:
        pass
    else:
        raise AssertionError("a bad address parsed")
    assert "not an address" not in net.PARSED
