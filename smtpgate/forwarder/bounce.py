"""bounce - delivery status notifications (RFC 3464) for smtpfwdd

DESCRIPTION
    report() builds a multipart/report; report-type=delivery-status message
    (RFC 6522) with the email package: a readable part saying which
    recipients failed and why, in the mail agent's own words; a
    message/delivery-status part (Reporting-MTA, Arrival-Date, and per
    recipient Final-Recipient, Action, Status, Diagnostic-Code); and the
    original's headers as text/rfc822-headers (never its body).
    queue() writes it into the spool as an ordinary message (FROM <>, RCPT
    <sender>), committed as smtpd commits (draft, fsync, rename, directory
    fsync), so the normal machinery delivers, defers and retries it.
    smtpfwdd decides when; this module only says what.
STATUS
    The mail agent's exit status (sysexits) maps to an RFC 3463 code as
    Postfix's sys_exits table does; STATUS below.  A recipient refused as
    unsafe is 5.1.3; a message older than QUEUE_LIFETIME is 4.4.7 with
    Action failed.
"""

import email.contentmanager  # noqa: F401  (the email package imports these
import email.generator  # noqa: F401        lazily; smtpfwdd runs as an
import email.headerregistry  # noqa: F401   unprivileged user who may not
import email.message                      # reach the library by then)
import email.policy
import email.utils
import os
import time

from smtpgate import spool
from smtpgate.address import bare
from smtpgate.text import one_line

WORDS_MAX = 900             # characters of the agent's words per recipient

STATUS = {
    64: "5.3.0",    # EX_USAGE       command line usage error
    65: "5.6.0",    # EX_DATAERR     data format error
    66: "5.3.0",    # EX_NOINPUT     cannot open input
    67: "5.1.1",    # EX_NOUSER      user unknown
    68: "5.1.2",    # EX_NOHOST      host name unknown
    69: "5.3.0",    # EX_UNAVAILABLE service unavailable
    70: "5.3.0",    # EX_SOFTWARE    internal software error
    71: "4.3.0",    # EX_OSERR       system resource problem
    72: "5.3.0",    # EX_OSFILE      critical OS file missing
    73: "5.2.0",    # EX_CANTCREAT   cannot create output file
    74: "5.3.0",    # EX_IOERR       input/output error
    75: "4.3.0",    # EX_TEMPFAIL    temporary failure
    76: "5.5.0",    # EX_PROTOCOL    remote error in protocol
    77: "5.7.0",    # EX_NOPERM      permission denied
    78: "5.3.5",    # EX_CONFIG      local configuration error
}
UNSAFE = "5.1.3"
EXPIRED = "4.4.7"
POLICY = email.policy.default.clone(linesep="\n", max_line_length=998)


def status_of(exit_status, temporary=False):
    """The RFC 3463 code for an agent's exit status (None: killed)."""
    code = STATUS.get(exit_status)
    if code is None:
        return "4.3.0" if temporary else "5.3.0"
    return code


class Failure:
    """One recipient we give up on (or, delayed, still try)."""

    def __init__(self, rcpt, status, words, detail=None, kind="x-unix"):
        self.rcpt = rcpt            # as stored, e.g. "<bob@my.domain>"
        self.kind = kind            # the Diagnostic-Code's type: x-unix (an agent), smtp
        self.status = status        # "5.1.1"
        self.words = one_line(words)[:WORDS_MAX]
        self.detail = detail or words   # for the log and failed/NAME.reason
        self.notify = None          # its RCPT's NOTIFY (RFC 3461), e.g. "FAILURE,DELAY"
        self.orcpt = None           # its RCPT's ORCPT, "rfc822;a+40b" (xtext)


def report(myname, sender, failures, headers, arrival, queue_id, action="failed",
           until=None, now=None, envid=None):
    """The notification as bytes (LF line ends)."""
    now = time.time() if now is None else now
    international = not (sender.isascii() and all(f.rcpt.isascii() for f in failures))
    policy = POLICY.clone(utf8=True) if international else POLICY   # RFC 6532, 6533
    msg = email.message.EmailMessage(policy=policy)
    msg["From"] = "MAILER-DAEMON@%s (Mail Delivery System)" % myname
    msg["To"] = unicode_of(bare(sender))
    msg["Subject"] = ("Undelivered Mail Returned to Sender" if action == "failed"
                      else "Delayed Mail (still being retried)")
    msg["Date"] = email.utils.formatdate(now, localtime=True)
    msg["Message-ID"] = email.utils.make_msgid("bounce", domain=myname)
    msg["Auto-Submitted"] = "auto-replied"
    msg.set_content(readable(myname, failures, queue_id, action, until))
    msg.make_mixed()
    msg.replace_header("Content-Type", "multipart/report")
    msg.set_param("report-type", "delivery-status")
    status = delivery_status(myname, failures, arrival, action, envid, international)
    msg.attach(status)
    original = email.message.Message(policy=policy)
    original.add_header("Content-Type", "message/global-headers" if international
                        else "text/rfc822-headers")
    original.add_header("Content-Transfer-Encoding", "8bit")
    original.set_payload(headers.decode("utf-8", "surrogateescape"))
    msg.attach(original)
    data = msg.as_bytes(policy=policy.clone(cte_type="8bit"))
    if international:
        data = data.replace(GLOBAL_TOKEN.encode(), status.fields, 1)
    return data


GLOBAL_TOKEN = "@@global-delivery-status-%s@@" % os.urandom(8).hex()


def unicode_of(address):
    """A stored address (octets as str) as text: its UTF-8 decoded (RFC
    6533's utf-8 address type), else as it is."""
    if address.isascii():
        return address
    try:
        return address.encode("latin-1").decode("utf-8")
    except (UnicodeDecodeError, UnicodeEncodeError):
        return address


def readable(myname, failures, queue_id, action, until):
    lines = ["This is the mail system at host %s." % myname, ""]
    if action == "failed":
        lines += ["Your message could not be delivered to one or more recipients.",
                  "It is attached below (its headers only).  The administrator of",
                  "%s keeps a copy (queue id %s)." % (myname, queue_id)]
    else:
        lines += ["Your message has not yet been delivered to one or more recipients.",
                  "It will be tried again until %s; you need not send it again." % (
                      email.utils.formatdate(until, localtime=True) if until else "it expires")]
    lines.append("")
    for f in failures:
        lines.append("%s: %s" % (unicode_of(bare(f.rcpt)), f.words or "no reason given"))
    return "\n".join(lines) + "\n"


def delivery_status(myname, failures, arrival, action, envid=None, international=False):
    """message/delivery-status: per-message fields, then per recipient
    (RFC 3464; the sender's ENVID and each ORCPT as it gave them); with a
    UTF-8 address, message/global-delivery-status (RFC 6533)."""
    def fields(pairs):
        block = email.message.Message(policy=POLICY)
        for name, value in pairs:
            block[name] = value
        return block
    part = email.message.Message(policy=POLICY)
    part.add_header("Content-Type", "message/global-delivery-status" if international
                    else "message/delivery-status")
    per_message = [("Reporting-MTA", "dns; %s" % myname)]
    if envid:
        per_message.insert(0, ("Original-Envelope-Id", envid))
    if arrival:
        per_message.append(("Arrival-Date", email.utils.formatdate(arrival, localtime=True)))
    blocks = [fields(per_message)]
    for f in failures:
        original = [("Original-Recipient", f.orcpt.replace(";", "; ", 1))] if f.orcpt else []
        rcpt = bare(f.rcpt)
        final = "rfc822; %s" % rcpt if rcpt.isascii() else "utf-8; %s" % unicode_of(rcpt)
        blocks.append(fields(original + [("Final-Recipient", final),
                              ("Action", action), ("Status", f.status),
                              ("Diagnostic-Code", "%s; %s" % (f.kind, f.words or "no reason given"))]))
    if international:       # (the email package writes only delivery-status' blocks)
        part.add_header("Content-Transfer-Encoding", "8bit")
        # (the email package writes a message/* text as ASCII only: a token
        # stands for the UTF-8 fields, put in by report() once written)
        text = "\n".join("".join("%s: %s\n" % kv for kv in b.items()) for b in blocks)
        part.set_payload(GLOBAL_TOKEN)
        part.fields = text.encode("utf-8")
        return part
    part.set_payload(blocks)
    return part


def queue(spooldir, sender, message, myname):
    """Commit the notification to the spool for sender; its name."""
    received = ("Received: by %s (smtpfwdd) with local id bounce;\n\t%s\n"
                % (myname, email.utils.formatdate(localtime=True))).encode()
    with spool.Draft(spooldir, b"<>", [sender.encode("latin-1")],
                     utf8=not sender.isascii()) as d:      # RFC 6533: sent SMTPUTF8
        d.write(received)
        d.write(message)
        return d.commit()


def warm_up():
    """Build one notification now, so that everything the email package
    loads on first use is loaded before smtpfwdd drops its privileges."""
    report("localhost", "<a@b.example>", [Failure("<c@d.example>", "5.1.1", "x")],
           b"Subject: x\n", 0, "smtpdXXXXXX", until=1)
    report("localhost", "<a@b.example>", [Failure("<c@d.example>", "4.3.0", "y")],
           b"Subject: \xe9\n", 1, "smtpdXXXXXX", action="delayed", until=1)


warm_up()
