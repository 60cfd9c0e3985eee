#!/usr/bin/env python3
"""atheris harness: the MAIL/RCPT address parser.

Only AddressError; an accepted address never starts with '-', never has an
unquoted comma or a control character, and fits the spool's 512-byte line."""
import sys

import atheris

with atheris.instrument_imports():
    import common  # noqa: F401
    from smtpgate import address
    from smtpgate.forwarder import delivery


def TestOneInput(data):
    fdp = atheris.FuzzedDataProvider(data)
    null_ok = fdp.ConsumeBool()
    arg = fdp.ConsumeUnicodeNoSurrogates(600)
    try:
        stored, params = address.parse_path(arg, null_ok)
    except address.AddressError as e:
        if e.code not in (501, 553):
            raise
        return
    if stored == "<>":
        return
    if delivery.check_recipient(stored) is not None:
        raise RuntimeError("accepted %r, which smtpfwdd refuses" % stored)
    if any(ord(c) < 0x20 or ord(c) > 0x7e for c in stored) or len(stored) > 256:
        raise RuntimeError("accepted %r" % stored)


atheris.Setup(sys.argv, TestOneInput)
atheris.Fuzz()
