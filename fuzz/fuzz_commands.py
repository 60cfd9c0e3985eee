#!/usr/bin/env python3
"""atheris harness: a whole SMTP session on arbitrary client bytes.

Only documented exit statuses; never an unexpected exception (EX_SOFTWARE)."""
import os
import sys
import tempfile

import atheris

with atheris.instrument_imports():
    import common  # noqa: F401
    import buildconf
    from smtpgate.gate import session
    from smtpgate.gate.config import GateConfig
    from smtpgate.gate.connection import Connection
    from smtpgate.gate.engine import in_process
    from smtpgate.gate.peer import Peer
    from smtpgate.rules import ruleset as engine

buildconf.SMTPD_ERROR_SLEEP = 0         # random input makes many errors: no tarpit
SPOOL = tempfile.mkdtemp(prefix="fuzz-cmd-")
CFG = GateConfig(myname="fuzz.example", spooldir=SPOOL, maxsize=4096)
ENGINE = in_process(engine.parse("noto:ALL:ALL:*@no.example:550 no\nallow:ALL:ALL:ALL\n")[0])
DEVNULL = os.open(os.devnull, os.O_WRONLY)


def TestOneInput(data):
    r, w = os.pipe()
    os.write(w, data[:60000])
    os.close(w)
    client = engine.Client("192.0.2.1", None)
    status = session.Session(CFG, ENGINE, Peer.around(client), Connection(r, DEVNULL)).run()
    os.close(r)
    if status not in (os.EX_OK, os.EX_OSERR, os.EX_PROTOCOL):
        raise RuntimeError("session ended with status %d" % status)
    for n in os.listdir(SPOOL):
        if n.startswith("draft."):
            raise RuntimeError("draft left behind: " + n)
        os.unlink(os.path.join(SPOOL, n))


atheris.Setup(sys.argv, TestOneInput)
atheris.Fuzz()
