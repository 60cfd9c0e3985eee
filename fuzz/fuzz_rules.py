#!/usr/bin/env python3
"""atheris harness: the rules parser and matcher.

Parsing raises only RuleError; a parsed file evaluates without exceptions."""
import sys

import atheris

with atheris.instrument_imports():
    import common  # noqa: F401
    from smtpgate.rules import ruleset as engine

CLIENTS = [engine.Client("192.0.2.10", "mail.example.org"),
           engine.Client("2001:db8::1", None), engine.Client(None, None)]


def TestOneInput(data):
    try:
        rules, _ = engine.parse(data)
    except engine.RuleError:
        return
    for c in CLIENTS:
        for f, t in (("<a@b.example>", "<bob@my.domain>"), ("<>", "postmaster")):
            v = engine.evaluate(rules, c, f, t)
            if v.action not in ("allow", "noto", "deny", "tempfail"):
                raise RuntimeError(v.action)
            if v.reply is not None and ("\n" in v.reply or len(v.reply) > 510):
                raise RuntimeError("bad reply %r" % v.reply)


atheris.Setup(sys.argv, TestOneInput)
atheris.Fuzz()
