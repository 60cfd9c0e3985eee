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
SETTINGS
    Those are the compiled-in defaults.  The operator's layer sits above
    them, as Postfix's main.cf does: SETTINGS_FILE (/etc/smtpd/smtpd.conf),
    "NAME = value" lines for any constant of the table but those fixed at
    build time (FIXED), '#' comment lines, a line that starts with a space
    or a tab continuing the value above.  Same kinds and bounds; every
    mistake is "file:line: message".  The file must be a regular file,
    root's (or the invoking user's) and writable by its owner only; a
    missing file is no settings.  buildconf.py reads it when it is imported
    (overlay()), so every program, module and tool sees the same values,
    with SETTINGS saying where each came from and what was wrong; smtpd and
    smtpfwdd read it again on SIGHUP (reread()).  `make install` never
    writes it: an upgrade keeps it.
"""

import ipaddress
import os
import re
import stat
import sys

ENTRY = re.compile(r"^#: (int (-?\d+)\.\.(-?\d+)|bool|path\??|name|text|nets): (.+)$")
ASSIGN = re.compile(r"^([A-Z][A-Z0-9_]*) *= *(.*?) *$")
SETTING = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)[ \t]*=[ \t]*(.*?)[ \t]*$")
FIXED = ("SETTINGS_FILE", "PREFIX")     # set by make, when the programs are built
SETTINGS_MAX = 1 << 20                  # octets of a settings file


class Param:
    def __init__(self, name, kind, low, high, default, doc):
        self.name, self.kind, self.low, self.high = name, kind, low, high
        self.default, self.doc = default, doc

    def convert(self, text):
        return int(text) if self.kind in ("int", "bool") and re.match(r"^-?\d+$", text) else text

    def bounds(self):
        """The kind and its bounds, as -N shows them: "int 0..86400"."""
        return "%s %d..%d" % (self.kind, self.low, self.high) if self.kind == "int" else self.kind

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
    out += ["}", "# the values given to make (config.mk)",
            "MADE = %r" % sorted(n for n in overrides if n in values), "",
            "# The operator's settings file over the values above (smtpgate/params.py).",
            "from smtpgate.params import overlay as _overlay  # noqa: E402",
            "SETTINGS = _overlay(globals())"]
    return "\n".join(out + [""])


def build(makefile, config_mk, target, given):
    params = table(open(makefile).read())
    try:
        kept = assignments(open(config_mk).read())
    except FileNotFoundError:
        kept = {}
    wanted = dict(kept, **{n: os.environ.get(n, "") for n in given})
    by_name = {p.name: p for p in params}
    wrong = ["%s = %s: %s" % (n, v, by_name[n].problem(by_name[n].convert(v)))
             for n, v in sorted(wanted.items())
             if n in by_name and by_name[n].problem(by_name[n].convert(v))]
    if wrong:
        sys.exit("make: refused, nothing changed:\n  " + "\n  ".join(wrong))
    overrides = persist(config_mk, given, os.environ)
    unknown = sorted(set(overrides) - set(by_name))
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
    table = conf["PARAMS"] if isinstance(conf, dict) else conf.PARAMS
    return [Param(n, k, lo, hi, d, doc) for n, (k, lo, hi, d, doc) in table.items()]


def check(conf):
    """'NAME = value: why' for every constant of conf (buildconf) out of
    bounds, after the settings file's own mistakes ('file:line: message')."""
    out = list(conf.SETTINGS.problems)
    for p in params_of(conf):
        why = p.problem(getattr(conf, p.name))
        if why:
            out.append("%s = %r: %s" % (p.name, getattr(conf, p.name), why))
    return out


class Settings:
    """What a settings file says: values {NAME: value}, where each was set
    {NAME: "file:line"}, and its problems ["file:line: message"]."""

    def __init__(self, path):
        self.path, self.values, self.origin, self.problems = path, {}, {}, []


def read_settings(path, params):
    """The Settings of the file at path for the [Param] params (a missing
    file, or no path, sets nothing)."""
    s = Settings(path)
    if not path:
        return s
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return s
    except OSError as e:
        s.problems.append("%s: %s" % (path, e.strerror))
        return s
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            s.problems.append("%s: not a regular file" % path)
        elif st.st_uid not in (0, os.geteuid()) or st.st_mode & 0o022:
            s.problems.append("%s: must be root's and writable by root only (chown root; "
                              "chmod 644): it decides what smtpd and smtpfwdd do" % path)
        else:
            text = os.read(fd, SETTINGS_MAX + 1)
            if len(text) > SETTINGS_MAX:
                s.problems.append("%s: larger than %d octets" % (path, SETTINGS_MAX))
            else:
                parse_settings(s, text.decode("utf-8", "replace"), params)
    finally:
        os.close(fd)
    return s


def parse_settings(s, text, params):
    by_name = {p.name: p for p in params}
    lines = []                  # [line number, NAME, value text]
    for n, line in enumerate(text.split("\n"), 1):
        line = line.rstrip("\r")
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line[0] in " \t":
            if not lines:
                s.problems.append("%s:%d: a continuation line, but no setting before it"
                                  % (s.path, n))
            else:
                lines[-1][2] = (lines[-1][2] + " " + line.strip()).strip()
            continue
        m = SETTING.match(line)
        if not m:
            s.problems.append("%s:%d: not NAME = value" % (s.path, n))
            continue
        lines.append([n, m.group(1), m.group(2)])
    for n, name, text in lines:
        where = "%s:%d" % (s.path, n)
        p = by_name.get(name)
        if p is None:
            s.problems.append("%s: %s is not a setting (smtpd -N lists them)" % (where, name))
        elif name in FIXED:
            s.problems.append("%s: %s is fixed when the programs are built (make %s=...)"
                              % (where, name, name))
        elif name in s.origin:
            s.problems.append("%s: %s set again (first at %s)" % (where, name, s.origin[name]))
        elif p.problem(p.convert(text)):
            s.problems.append("%s: %s = %s: %s" % (where, name, text,
                                                   p.problem(p.convert(text))))
        else:
            s.values[name], s.origin[name] = p.convert(text), where


def overlay(conf):
    """Called by buildconf.py as it is imported (conf: its globals): the
    settings file's values over the compiled-in ones; its Settings."""
    params = params_of(conf)
    conf["COMPILED"] = {p.name: conf[p.name] for p in params}
    s = read_settings(conf["SETTINGS_FILE"], params)
    if not s.problems:
        conf.update(s.values)
    return s


def reread(conf):
    """SIGHUP: the settings file of conf (buildconf) read again: (its
    Settings, {NAME: value} of what now differs from the values in
    effect).  Settings with problems change nothing."""
    params = params_of(conf)
    new = read_settings(conf.SETTINGS_FILE, params)
    changes = {}
    if not new.problems:
        for p in params:
            value = new.values.get(p.name, conf.COMPILED[p.name])
            if p.name not in FIXED and value != getattr(conf, p.name):
                changes[p.name] = value
    return new, changes


def apply(conf, settings, values):
    """Make values ({NAME: value}) those of conf, and settings its record of
    where they came from; what undoes it: apply(conf, *undo)."""
    undo = conf.SETTINGS, {n: getattr(conf, n) for n in values}
    for name, value in values.items():
        setattr(conf, name, value)
    conf.SETTINGS = settings
    return undo


def text(values):
    return ", ".join("%s = %s" % kv for kv in sorted(values.items()))


def origin(conf, name):
    """Where the value of name in effect came from, or None (the default)."""
    where = conf.SETTINGS.origin.get(name)
    if where:
        return where
    if name in conf.MADE:
        return "make %s=... (config.mk)" % name
    return None


def show(conf, everything=False):
    """The constants in effect as lines "NAME = value": those that differ
    from the Makefile's defaults (postconf -n), each after a comment that
    says where it was set, or all, each after its documentation, kind,
    bounds and default."""
    lines = []
    for p in params_of(conf):
        value, where = getattr(conf, p.name), origin(conf, p.name)
        if everything:
            lines.append("# %s (%s; default %s)" % (p.doc, p.bounds(), p.default))
        if everything or value != p.default:
            if where and value != p.default:
                lines.append("# set in %s" % where)
            lines.append("%s = %s" % (p.name, value))
    return lines


if __name__ == "__main__":
    if len(sys.argv) < 5 or sys.argv[1] != "build":
        sys.exit(__doc__)
    try:
        build(*sys.argv[2:5], sys.argv[5:])
    except ValueError as e:
        sys.exit(str(e))
