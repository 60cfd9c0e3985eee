"""config - what smtpfwdd runs with: its options and the Makefile's
constants, built once

DESCRIPTION
    build(flags) makes the ForwarderConfig the daemon, its delivery
    processes and the queue tool read: frozen, never changed after.  What
    changes while smtpfwdd runs -- its locks, its delivery processes -- is
    the Forwarder's (daemon.py).
"""

import dataclasses
import os
import sys

import buildconf
from smtpgate import log, metrics, params, privileges, record

SPOOL = os.path.normpath(os.path.join(buildconf.SPOOLDIR, buildconf.SPOOLSUBDIR))
# What a SIGHUP cannot change: the spool and identity it runs in, its log.
RESTART_ONLY = frozenset(("SPOOLDIR", "SPOOLSUBDIR", "SMTP_USER", "SMTP_GROUP", "PID_DIR",
                          "LOG_FACILITY", "LOG_SOCKET", "SMTPFWDD_METRICS_LISTEN"))


@dataclasses.dataclass(frozen=True)
class ForwarderConfig:
    spooldir: str = SPOOL                       # -d
    user: str = buildconf.SMTP_USER             # -u
    group: str = buildconf.SMTP_GROUP           # -g
    agent: str = buildconf.MAIL_AGENT           # -s: the mail agent
    maxchildren: int = buildconf.MAXCHILDREN    # -M: delivery processes
    poll: int = buildconf.POLL_TIME             # -P: seconds between scans
    quiet: bool = False                         # -q: one line per message
    foreground: bool = False                    # -F
    pidfile: str = None                         # -i: a pid file outside the spool
    myname: str = "localhost"                   # this host, for notifications
    check: bool = False                         # -t: check, start nothing
    flags: tuple = ()                           # the command line's fields, for a reload


def agent_problem(text):
    """Why text is no mail agent (a program's absolute path, or smtp: or
    lmtp: as relay.py reads them), or None."""
    from smtpgate.forwarder import relay
    try:
        if relay.parse(text) is not None:
            return None
    except ValueError as e:
        return str(e)
    return None if text.startswith("/") else "not an absolute path, smtp: or lmtp:"


def build(flags, reloading=False):
    """The ForwarderConfig for the command line's fields (options.parse);
    a constant of the Makefile out of its bounds stops smtpfwdd with 78 (a
    reload gets the problems as a list: the daemon keeps what it has)."""
    problems = params.check(buildconf)
    metrics.check_listen("SMTPFWDD_METRICS_LISTEN", buildconf.SMTPFWDD_METRICS_LISTEN, problems)
    record.check("SMTPD_LOG_FORMAT", buildconf.SMTPD_LOG_FORMAT, problems)
    agent = flags.get("agent", buildconf.MAIL_AGENT)
    why = agent_problem(agent)
    if why:
        problems.append("MAIL_AGENT = %s: %s" % (agent, why) if "agent" not in flags
                        else "-s %s: %s" % (agent, why))
    if problems and reloading:
        return problems
    for p in problems:
        log.err("%s", p)
        if not log.log.stderr:
            print("smtpfwdd.py: %s" % p, file=sys.stderr)
    if problems:
        sys.exit(os.EX_CONFIG)
    made = dict(user=buildconf.SMTP_USER, group=buildconf.SMTP_GROUP,
                agent=buildconf.MAIL_AGENT, maxchildren=buildconf.MAXCHILDREN,
                poll=buildconf.POLL_TIME)
    return ForwarderConfig(**dict(made, **flags, myname=privileges.own_name(),
                                  flags=tuple(sorted(flags.items()))))
