"""params - the table of the Makefile's constants: read, persist, write, check

SYNOPSIS
    python3 -m smtpgate.params build Makefile config.mk buildconf.py [NAME...]
DESCRIPTION
    Every tunable constant is one entry of the table at the top of the
    Makefile: a line "#: KIND: one line of documentation" and, just below
    it, "NAME = default".  KIND is one of
        int LOW..HIGH   a whole number within those bounds
        bool            0 or 1
        path            an absolute path;   path? the same, or empty
        name            a word (a user, a group, a facility)
        text            anything, empty included
        nets            addresses and networks (CIDR), space-separated
    `make NAME=value` (make passes the NAMEs given on its command line, and
    their values in the environment) records the value in config.mk, which
    the Makefile includes: it persists until changed again, or until
    `make defaults` removes config.mk.  build then writes buildconf.py: every
    value in effect, and PARAMS, the table itself, from which the programs
    check their constants at start (check) and print them (show: smtpd -n,
    -N).  Nothing else lists the constants.
"""

import ipaddress
import os
import re
import sys

ENTRY = re.compile(r"^#: (int (-?\d+)\.\.(-?\d+)|bool|path\??|name|text|nets): (.+)$")
ASSIGN = re.compile(r"^([A-Z][A-Z0-9_]*) *= *(.*?) *$")


class Param:
    def __init__(self, name, kind, low, high, default, doc):
        self.name, self.kind, self.low, self.high = name, kind, low, high
        self.default, self.doc = default, doc

    def convert(self, text):
        return int(text) if self.kind in ("int", "bool") and re.match(r"^-?\d+$", text) else text

    def problem(self, value):
        """Why value is not one this constant may have, or None."""
        if self.kind in ("int", "bool"):
            low, high = (0, 1) if self.kind == "bool" else (self.low, self.high)
            if not isinstance(value, int) or not low <= value <= high:
                return "must be a number from %d to %d" % (low, high)
        elif self.kind.startswith("path"):
            if not (value.startswith("/") or (value == "" and self.kind == "path?")):
                return "must be an absolute path" + (" or empty" if self.kind == "path?" else "")
        elif self.kind == "name":
            if not re.match(r"^[\w.-]+$", value):
                return "must be one word"
        elif self.kind == "nets":
            for tok in value.split():
                try:
                    ipaddress.ip_network(tok, strict=False)
                except ValueError:
                    return "%r is not an address or network" % tok
        return None


def table(makefile_text):
    """[Param] of the Makefile, in its order; ValueError for a malformed entry."""
    out, lines = [], makefile_text.split("\n")
    for i, line in enumerate(lines):
        if not line.startswith("#: "):
            continue
        m = ENTRY.match(line)
        a = ASSIGN.match(lines[i + 1]) if m and i + 1 < len(lines) else None
        if a is None:
            raise ValueError("Makefile:%d: not '#: KIND: doc' then 'NAME = default'" % (i + 1))
        kind = m.group(1).split()[0]
        low, high = (int(m.group(2)), int(m.group(3))) if kind == "int" else (None, None)
        p = Param(a.group(1), kind, low, high, None, m.group(4))
        p.default = p.convert(a.group(2))
        out.append(p)
    return out


def assignments(text):
    """{NAME: value text} of the plain assignments in text (config.mk)."""
    return {m.group(1): m.group(2) for m in map(ASSIGN.match, text.split("\n")) if m}


def persist(path, given, env):
    """Record in config.mk the values of the NAMEs given to make."""
    try:
        kept = assignments(open(path).read())
    except FileNotFoundError:
        kept = {}
    if not given:
        return kept
    kept.update((n, env.get(n, "")) for n in given)
    with open(path + ".tmp", "w") as f:
        f.write("# Written by `make NAME=value`; `make defaults` removes it.\n")
        f.write("".join("%s = %s\n" % kv for kv in sorted(kept.items())))
    os.replace(path + ".tmp", path)
    return kept


def generated(params, overrides):
    """The text of buildconf.py."""
    values = {p.name: p.convert(overrides.get(p.name, str(p.default))) for p in params}
    out = ['"""Generated from Makefile and config.mk; do not edit."""', ""]
    out += ["%s = %r" % (p.name, values[p.name]) for p in params]
    out += ["", "# name: (kind, low, high, default, documentation), as in the Makefile",
            "PARAMS = {"]
    out += ["    %r: %r," % (p.name, (p.kind, p.low, p.high, p.default, p.doc)) for p in params]
    return "\n".join(out + ["}", ""])


def build(makefile, config_mk, target, given):
    params = table(open(makefile).read())
    overrides = persist(config_mk, given, os.environ)
    unknown = sorted(set(overrides) - {p.name for p in params})
    if unknown:
        print("%s: not constants of the Makefile: %s" % (config_mk, " ".join(unknown)),
              file=sys.stderr)
    text = generated(params, overrides)
    try:
        if open(target).read() == text:
            return
    except FileNotFoundError:
        pass
    with open(target + ".tmp", "w") as f:
        f.write(text)
    os.replace(target + ".tmp", target)
    print("wrote %s" % target)


# -- in the programs (buildconf is the generated module) --

def params_of(conf):
    return [Param(n, k, lo, hi, d, doc) for n, (k, lo, hi, d, doc) in conf.PARAMS.items()]


def check(conf):
    """'NAME = value: why' for every constant of conf (buildconf) out of bounds."""
    out = []
    for p in params_of(conf):
        why = p.problem(getattr(conf, p.name))
        if why:
            out.append("%s = %r: %s" % (p.name, getattr(conf, p.name), why))
    return out


def show(conf, everything=False):
    """The constants in effect as lines "NAME = value": those that differ
    from the Makefile's defaults (postconf -n), or all, each with its
    documentation and default as a comment."""
    lines = []
    for p in params_of(conf):
        value = getattr(conf, p.name)
        if everything:
            lines.append("# %s (%s; default %s)" % (p.doc, p.kind, p.default))
        if everything or value != p.default:
            lines.append("%s = %s" % (p.name, value))
    return lines


if __name__ == "__main__":
    if len(sys.argv) < 5 or sys.argv[1] != "build":
        sys.exit(__doc__)
    try:
        build(*sys.argv[2:5], sys.argv[5:])
    except ValueError as e:
        sys.exit(str(e))
