#!/usr/bin/env python3
"""atheris harness: the PROXY protocol parsers (proxy.py), v1 and v2.

Only ProxyError; a header that parses names addresses and ports in range.
(proxy.read over a socket is fuzzed by Hypothesis in t/test_proxy.py: under
atheris' instrumentation of Python 3.11 its socket loop raised a spurious
TypeError.)"""
import sys

import atheris

with atheris.instrument_imports():
    import common  # noqa: F401
    from smtpgate.gate import proxy


def check(got):
    if got is None:
        return
    (src, sport), (dst, dport) = got
    if not (0 <= sport <= 65535 and 0 <= dport <= 65535 and src and dst):
        raise RuntimeError("bad result %r" % (got,))


def TestOneInput(data):
    for parse in (proxy.parse_v1, proxy.parse_v2):
        try:
            check(parse(data))
        except proxy.ProxyError:
            pass


atheris.Setup(sys.argv, TestOneInput)
atheris.Fuzz()
