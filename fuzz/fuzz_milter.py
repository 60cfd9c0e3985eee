#!/usr/bin/env python3
"""atheris harness: the milter client's reading of a filter (milter.py) and
the changes it applies (rewrite.py), fed a filter's side of a whole session.

The input is read as a filter's stream: a negotiation, then packets of
reply and change codes with payloads the fuzzer picks, framed or raw.
Only milter.Broken and rewrite.Invalid; every reply it makes us give is an
SMTP reply of printable ASCII (milter_replay.check)."""
import struct
import sys

import atheris

with atheris.instrument_imports():
    import common  # noqa: F401
    import milter_replay

CODES = b"cacaacprtdy4qhim+2-besOZ"


def stream(data):
    fdp = atheris.FuzzedDataProvider(data)
    out = [struct.pack("!IcIII", 13, b"O", fdp.PickValueInList([2, 6, 6, 7]),
                       fdp.PickValueInList([0x1FF, 0x1FF, 0x3FF, 0]), fdp.ConsumeIntInRange(0, 1 << 21))]
    while fdp.remaining_bytes():
        if fdp.ConsumeIntInRange(0, 15) == 0:
            out.append(fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 8)))      # noise
            continue
        code = CODES[fdp.ConsumeIntInRange(0, len(CODES) - 1):][:1]
        payload = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 64))
        out.append(struct.pack("!I", len(payload) + 1) + code + payload)
    return b"".join(out)


def TestOneInput(data):
    milter_replay.exercise(stream(data))


atheris.Setup(sys.argv, TestOneInput)
atheris.Fuzz()
