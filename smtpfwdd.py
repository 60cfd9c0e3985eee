#!/usr/bin/env python3
"""smtpfwdd - Obtuse-compatible spool forwarder: one mail agent per message

SYNOPSIS
    smtpfwdd.py [-Fq] [-d spooldir] [-u user] [-g group] [-s mailprog]
                [-M maxchildren] [-P polltime] [-i pidfile]
    smtpfwdd.py [-d spooldir] -Q list [-j] | show ID | requeue ID|all-failed
                | delete ID | flush
    smtpfwdd.py -t [flags]
DESCRIPTION
    Scans the spool every -P seconds (or on SIGUSR1) and hands each complete
    smtpd* file to one of at most -M delivery processes, which runs
        mailprog -oi -f <sender> -- <recipient>...
    (never through a shell) with the message on standard input.  Exit
    status 0 removes the file; 71 72 74 75 defer it; what cannot get better
    and messages older than QUEUE_LIFETIME go to failed/, and the sender
    gets a delivery status notification.  Nothing accepted is deleted
    unless delivered.  -Q is the queue tool (also installed as `smtpq`).
    The settings file SETTINGS_FILE (/etc/smtpd/smtpd.conf) is read over
    the Makefile's defaults at start and on SIGHUP.  -t checks what a start
    would (constants, settings, identity, spool, agent), exits 78 saying
    what is wrong, or 0, and starts nothing.
    The program is its options; smtpgate/forwarder/ is the rest.
SECURITY
    Runs as -u/-g (supplementary groups cleared), never as root; the queue
    tool, started as root, becomes the spool's owner before it reads it.
SIGNALS
    SIGTERM, SIGINT: stop scanning, wait up to SHUTDOWN_TIMEOUT seconds for
    running deliveries, empty the -i pid file, exit 0.  SIGUSR1: scan now.
    SIGHUP: read the settings file again, then scan.
EXIT STATUS
    0 stopped, -t found nothing wrong; 64 usage, unknown user or group; 78
    root identity, spool that cannot be entered, another smtpfwdd running,
    a constant or setting out of bounds, what -t found.
"""

import os
import sys

import buildconf
from smtpgate import log, options
from smtpgate.forwarder import config, queuetool, start

USAGE = """usage: smtpfwdd.py [-Fq] [-d spooldir] [-u user] [-g group] [-s mailprog]
                   [-M maxchildren] [-P polltime] [-i pidfile]
       smtpfwdd.py [-d spooldir] -Q list [-j] | show ID | requeue ID|all-failed
                   | delete ID | flush
       smtpfwdd.py -t [flags]"""
def agent(flag, value):
    """-s: a program's absolute path, or smtp:... or lmtp:... (checked by
    config.build, with the settings)."""
    if value.startswith(("smtp:", "lmtp:")):
        return value
    return options.absolute(flag, value)


FLAGS = {"-d": ("spooldir", options.absolute), "-s": ("agent", agent),
         "-i": ("pidfile", options.absolute), "-u": ("user", options.text),
         "-g": ("group", options.text), "-M": ("maxchildren", options.between(1, 1000)),
         "-P": ("poll", options.between(1, 1000)), "-q": ("quiet", True),
         "-F": ("foreground", True), "-Q": ("queue", True), "-t": ("check", True)}


def main(argv):
    log.log.open("smtpfwdd", buildconf.LOG_FACILITY, pid=True, path=buildconf.LOG_SOCKET)
    try:
        flags, args = options.parse(argv, FLAGS, takes_args=True)
        if args and not flags.get("queue"):
            raise options.UsageError("unexpected argument %r" % args[0])
    except options.UsageError as e:     # 64 as smtpd's (the original said 78)
        log.err("%s", e)
        print("smtpfwdd.py: %s\n%s" % (e, USAGE), file=sys.stderr)
        return os.EX_USAGE
    if flags.pop("queue", False):
        return queuetool.main(flags.get("spooldir", config.SPOOL), args)
    log.log.stderr = flags.get("foreground", False) or flags.get("check", False)
    log.log.say_if_unheard("smtpfwdd", stays=log.log.stderr)
    return start.run(config.build(flags))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
