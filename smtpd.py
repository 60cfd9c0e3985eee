#!/usr/bin/env python3
"""smtpd - Obtuse-compatible SMTP storing daemon

SYNOPSIS
    smtpd.py [-DFHLPq] [-c chrootdir] [-d spooldir] [-u user] [-g group]
             [-m myname] [-s maxsize] [-l address] [-p port] [-i pidfile] [-M max]
             [-C certfile] [-K keyfile] [-X proxies] [-V backend]
DESCRIPTION
    Speaks SMTP on stdin (inetd) or on a listening socket (-D) and writes each
    accepted message to the spool for smtpfwdd(8).  Every recipient is checked
    against the smtpd_check_rules file (checkrules.py).  STARTTLS is offered
    with the certificate -C and key -K (TLS_CERT, TLS_KEY).  Behind a load
    balancer, connections from the networks -X (SMTPD_PROXY_FROM) begin with
    a PROXY header naming the real client (proxy.py).  A "verify" rule asks
    the backend MTA -V (SMTPD_VERIFY_BACKEND) whether a recipient exists
    (verify.py).
SECURITY
    Talks to the network.  Sessions run chrooted to -c as -u/-g; only the
    master keeps root, and it never reads network input.  Everything the jail
    lacks (imports, resolver, syslog socket, time zone, own name, the TLS
    certificate and key) is done before the chroot.
EXIT STATUS
    0 QUIT or -l refusal; 1 another -D daemon holds the pid file; 64 usage;
    70 unexpected error in a session; 71 client gone, timeout, I/O error;
    73 a spool file cannot be created; 76 denied by a rule, too many
    errors or a protocol violation; 78 configuration error.
"""

import sys

from smtpgate.gate import program

if __name__ == "__main__":
    sys.exit(program.main(sys.argv[1:]))
