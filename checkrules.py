#!/usr/bin/env python3
"""checkrules - test smtpd_check_rules before smtpd uses them

SYNOPSIS
    checkrules.py [-v] [-f rules] [-a address] [-n hostname] [-u identuser]
                  [-V backend] FROM TO
    checkrules.py -t [-f rules]
DESCRIPTION
    Runs smtpd's rules engine on one recipient and prints what smtpd would
    do: "allow", "noto <reply>", "deny <reply>", "tempfail <reply>" or
    "verify", and with -v the deciding "file:line: rule" (tcpdmatch to
    tcp_wrappers).  -a is the client's address, -n its confirmed host name
    (UNKNOWN: none; without -n, the DNS as smtpd asks it), -u its ident
    user, -V the verification backend to ask; FROM and TO as the client
    typed them.  -t validates the file.  (smtpgate/gate/tester.py)
EXIT STATUS
    0 allow, 1 noto, 2 deny, 3 refused by smtpd's address checks (or,
    with -a and SMTPD_DNSBL_SITES, by the DNS lists' score),
    4 verify (not asked), 75 temporary failure, 64 usage, 78 bad file.
FILES
    SPOOLDIR/CHECK_FILE, normally /var/spool/smtpd/etc/smtpd_check_rules.
"""

import os
import sys

from smtpgate import options
from smtpgate.gate import tester

USAGE = """usage: checkrules.py [-v] [-f rules] [-a address] [-n hostname] [-u identuser]
                     [-V backend] FROM TO
       checkrules.py -t [-f rules]"""
FLAGS = {"-t": ("validate", True), "-v": ("verbose", True), "-f": ("rules", options.text),
         "-a": ("address", options.text), "-n": ("name", options.text),
         "-u": ("ident", options.text), "-V": ("backend", options.text)}


def main(argv):
    try:
        return tester.run(*options.parse(argv, FLAGS, takes_args=True))
    except options.UsageError as e:
        print("checkrules.py: %s\n%s" % (e, USAGE), file=sys.stderr)
        return os.EX_USAGE


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
