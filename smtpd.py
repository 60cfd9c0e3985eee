#!/usr/bin/env python3
"""smtpd - Obtuse-compatible SMTP storing daemon

SYNOPSIS
    smtpd.py [-DFHLPq] [-c chrootdir] [-d spooldir] [-u user] [-g group]
             [-m myname] [-s maxsize] [-l address] [-p port] [-i pidfile] [-M max]
             [-C certfile] [-K keyfile] [-X proxies] [-V backend] [-f milters]
    smtpd.py -n | -N
    smtpd.py -t [flags]
DESCRIPTION
    Speaks SMTP on stdin (inetd) or on a listening socket (-D) and writes each
    accepted message to the spool for smtpfwdd(8).  Every recipient is checked
    against the smtpd_check_rules file.  STARTTLS is offered with the
    certificate -C and key -K (TLS_CERT, TLS_KEY).  Behind a load balancer,
    connections from the networks -X (SMTPD_PROXY_FROM) begin with a PROXY
    header naming the real client.  A "verify" rule asks the backend MTA -V
    (SMTPD_VERIFY_BACKEND) whether a recipient exists.  Filters -f
    (SMTPD_MILTERS: rspamd, OpenDKIM...) judge each message by the milter
    protocol before the 250.  The Makefile's constants are the compiled-in
    defaults; the operator's settings file SETTINGS_FILE
    (/etc/smtpd/smtpd.conf, NAME = value) is read over them at start and on
    SIGHUP.  -n prints the values in effect that differ from the defaults
    and where each was set (as postconf -n), -N all of them with their
    documentation and bounds.  -t checks what a start would check -- flags,
    constants, settings, certificate and key, filters, shared store, rules
    -- says what is wrong and exits 78, or 0 and starts nothing.  The
    program is its options; smtpgate/gate/ is the rest
    (smtpgate/__init__.py is the map).
SECURITY
    Talks to the network.  Sessions run chrooted to -c as -u/-g under a
    seccomp filter; only the master keeps root, and it never reads network
    input.  Everything the jail lacks (imports, resolver, syslog socket, time
    zone, own name, the TLS certificate and key) is done before the chroot.
EXIT STATUS
    0 QUIT or -l refusal, -t found nothing wrong; 1 another -D daemon holds
    the pid file; 64 usage;
    70 unexpected error in a session; 71 client gone, timeout, I/O error;
    73 a spool file cannot be created; 76 denied by a rule, too many
    errors or a protocol violation; 78 configuration error.
"""

import os
import signal
import sys

import buildconf
from smtpgate import log, net, options, params
from smtpgate.gate import config, start

USAGE = """usage: smtpd.py [-DFHLPq] [-c chrootdir] [-d spooldir] [-u user] [-g group]
                [-m myname] [-s maxsize] [-l address] [-p port] [-i pidfile] [-M max]
                [-C certfile] [-K keyfile] [-X proxies] [-V backend] [-f milters]
       smtpd.py -n | -N
       smtpd.py -t [flags]"""


def milters(flag, value):
    try:
        net.parse_milters(value)
    except ValueError as e:
        raise options.UsageError("%s: %s" % (flag, e)) from None
    return value


def networks(flag, value):
    try:
        net.parse_networks(value, flag)
    except net.ConfigError as e:
        raise options.UsageError(str(e)) from None
    return value


FLAGS = {"-c": ("chroot", options.absolute), "-d": ("spooldir", options.absolute),
         "-u": ("user", options.text), "-g": ("group", options.text),
         "-m": ("myname", options.text), "-s": ("maxsize", options.count),
         "-l": ("listen", options.address), "-p": ("port", options.port),
         "-i": ("pidfile", options.absolute), "-M": ("maxchildren", options.positive),
         "-C": ("tls_cert", options.absolute), "-K": ("tls_key", options.absolute),
         "-X": ("proxies", networks), "-V": ("verify", options.text),
         "-f": ("milters", milters),
         "-D": ("daemon", True), "-F": ("foreground", True), "-H": ("hostchecks", False),
         "-L": ("log_pid", False), "-P": ("paranoid", True), "-q": ("quiet", True),
         "-n": ("show", "changed"), "-N": ("show", "all"), "-t": ("check", True)}


def main(argv):
    log.log.open("smtpd", buildconf.LOG_FACILITY, pid=True, stderr=not log.stderr_is_socket(),
                 path=buildconf.LOG_SOCKET)
    try:
        flags, _ = options.parse(argv, FLAGS)
    except options.UsageError as e:
        log.err("%s", e)
        if not log.stderr_is_socket():      # under inetd, stderr is the client
            print(USAGE, file=sys.stderr)
        return os.EX_USAGE
    if "show" in flags:         # like postconf -n: the constants in effect
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)       # smtpd -N | head
        for line in params.show(buildconf, everything=flags["show"] == "all"):
            print(line)
        return os.EX_OK
    if not flags.get("log_pid", True):
        log.log.open("smtpd", buildconf.LOG_FACILITY, pid=False, path=buildconf.LOG_SOCKET,
                     stderr=log.log.stderr)
    if flags.get("foreground"):
        log.log.stderr = True
    # Detached (-D without -F), standard error is gone: say so if syslog is too.
    log.log.say_if_unheard("smtpd", stays=flags.get("foreground") or flags.get("check")
                           or not flags.get("daemon"))
    return start.run(config.build(flags))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
