"""options - the command lines of smtpd, smtpfwdd and checkrules, from tables

DESCRIPTION
    Each program declares its flags as a table, flag -> (field, kind), and
    parse() reads argv with getopt against it: a kind is a function that
    checks and converts the flag's argument, raising UsageError with a
    message that names the flag, or any other value: a switch, whose field
    takes that value.  parse() returns the fields given, and the arguments
    left.  What a program does with a UsageError (its exit status, whether
    the usage goes to stderr) is its own.
"""

import getopt
import ipaddress


class UsageError(Exception):
    """A bad command line; str() says what is wrong."""


def parse(argv, table, takes_args=False):
    """({field: value}, args) for argv; UsageError."""
    letters = "".join(f[1] + (":" if callable(kind) else "") for f, (_, kind) in table.items())
    try:
        opts, args = getopt.getopt(argv, letters)
    except getopt.GetoptError as e:
        raise UsageError(str(e)) from None
    if args and not takes_args:
        raise UsageError("unexpected argument %r" % args[0])
    values = {}
    for flag, value in opts:
        field, kind = table[flag]
        values[field] = kind(flag, value) if callable(kind) else kind
    return values, args


def absolute(flag, value):
    if not value.startswith("/"):
        raise UsageError("%s needs an absolute path, not %r" % (flag, value))
    return value


def text(flag, value):
    return value


def positive(flag, value):
    if not value.isdigit() or int(value) <= 0:
        raise UsageError("%s needs a positive number, not %r" % (flag, value))
    return int(value)


def count(flag, value):
    """A number that may be 0 (e.g. -s 0: no size limit)."""
    if not value.isdigit():
        raise UsageError("%s needs a number (0: no limit), not %r" % (flag, value))
    return int(value)


def between(low, high):
    def check(flag, value):
        if not value.isdigit() or not low <= int(value) <= high:
            raise UsageError("%s needs a number from %d to %d, not %r"
                             % (flag, low, high, value))
        return int(value)
    return check


def port(flag, value):
    if not value.isdigit() or not 0 < int(value) <= 65535:
        raise UsageError("%s %s: no such port" % (flag, value))
    return int(value)


def address(flag, value):
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise UsageError("%s needs an IPv4 or IPv6 address, not %r" % (flag, value)) from None
