#!/usr/bin/env python3
"""checkrules - the smtpd_check_rules engine and its tester

SYNOPSIS
    checkrules.py [-v] [-f rules] [-a address] [-n hostname] [-u identuser]
                  [-V backend] FROM TO
    checkrules.py -t [-f rules]
DESCRIPTION
    The rules engine smtpd(8) runs at each RCPT, and a tester that runs the
    same code: it prints "allow", "noto <reply>" or "deny <reply>" (or
    "tempfail <reply>" when a lookup failed) and, with -v, the deciding
    "file:line: rule" or "default".  An address smtpd itself refuses (a
    leading '-', an unquoted ',', ...) is reported first, as smtpd answers
    it: "refused <reply>".  A "verify" rule prints "verify"; with -V
    [lmtp:]address:port the tester asks that backend as smtpd would and
    prints the outcome (with -v, the backend's words).  -t validates the
    file and prints every error and warning as "file:line: message".
    -a is the client address (none: IP tokens never match); -n its confirmed
    host name, UNKNOWN for none (without -n the name comes from DNS as smtpd
    gets it); -u its ident user.  FROM and TO as the client typed them.
EXIT STATUS
    0 allow, 1 noto, 2 deny, 3 refused by smtpd's address checks,
    4 verify (not asked), 75 temporary failure, 64 usage, 78 bad file.
FILES
    SPOOLDIR/CHECK_FILE, normally /var/spool/smtpd/etc/smtpd_check_rules.
"""

import sys

from smtpgate.rules import engine

if __name__ == "__main__":
    sys.exit(engine.main(sys.argv[1:]))
