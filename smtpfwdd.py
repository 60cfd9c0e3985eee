#!/usr/bin/env python3
"""smtpfwdd - Obtuse-compatible spool forwarder: one mail agent per message

SYNOPSIS
    smtpfwdd.py [-Fq] [-d spooldir] [-u user] [-g group] [-s mailprog]
                [-M maxchildren] [-P polltime] [-i pidfile]
    smtpfwdd.py [-d spooldir] -Q list [-j] | show ID | requeue ID|all-failed
                | delete ID | flush
DESCRIPTION
    Scans the spool every -P seconds (or on SIGUSR1) and hands each complete
    smtpd* file to one of at most -M long-lived delivery processes, which runs
        mailprog -oi -f <sender> -- <recipient>...
    (never through a shell) with the message on standard input, at most
    MAXARGS arguments per call, marking delivered batches SENT.  Exit status
    0 removes the file; 71 72 74 75 defer it (retried after
    RETRY_DELAY_TIME); 78, a missing agent or a signal defer it and log
    CRIT; anything else, and a message deferred beyond QUEUE_LIFETIME, moves
    it to failed/ with the reason, and the sender gets a delivery status
    notification (delivery.py, bounce.py).  Nothing accepted is deleted
    unless delivered.  -Q is the queue tool (queuetool.py, also `smtpq`).
SECURITY
    Runs as -u/-g (supplementary groups cleared), never as root.  The
    spool lock .smtpfwdd.lock holds our pid as the original's did, but the
    jail can write it: tools find us through the kernel's lock table, init
    scripts through -i, a pid file root opens before we drop privileges.
SIGNALS
    SIGTERM, SIGINT: stop scanning, wait up to SHUTDOWN_TIMEOUT seconds for
    running deliveries, exit 0.  SIGUSR1, SIGHUP: scan now.
"""

import sys

from smtpgate.forwarder import daemon

if __name__ == "__main__":
    sys.exit(daemon.main(sys.argv[1:]))
