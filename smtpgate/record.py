"""record - the one structured line per message, per session and per delivery

DESCRIPTION
    SMTPD_LOG_FORMAT chooses how smtpd and smtpfwdd tell what became of a
    message: classic (the original's lines, the default: nothing here is
    used), logfmt (key=value pairs) or json (one object).  text(event,
    fields) writes one record: "event" first, then the fields in the order
    given, those whose value is None left out.  A list is a JSON array, or
    in logfmt its items joined by ","; a dict (a refused recipient, a
    filter's verdict) is a JSON object, or in logfmt its values joined by
    "/".  In logfmt a value with a space, a quote, "=" or nothing in it is
    quoted ("..." with \\" and \\\\).  Control characters are escaped by
    log.py as in every line.  The field names are stable: smtpd(8) lists
    them, and smtpq show prints a message's record with the same names.
"""

import json

FORMATS = ("classic", "logfmt", "json")


def check(name, value, problems):
    if value not in FORMATS:
        problems.append("%s = %s: not one of %s" % (name, value, ", ".join(FORMATS)))


def text(event, fields, form="logfmt"):
    pairs = [("event", event)] + [(k, v) for k, v in fields if v is not None]
    if form == "json":
        return json.dumps(dict(pairs), ensure_ascii=False, separators=(",", ":"))
    return " ".join("%s=%s" % (k, logfmt_value(v)) for k, v in pairs)


def flat(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return "%.3f" % v
    if isinstance(v, dict):
        return "/".join(flat(x) for x in v.values())
    return str(v)


def logfmt_value(v):
    v = ",".join(flat(x) for x in v) if isinstance(v, (list, tuple)) else flat(v)
    if v == "" or any(c in v for c in ' "=\\'):
        return '"%s"' % v.replace("\\", "\\\\").replace('"', '\\"')
    return v
