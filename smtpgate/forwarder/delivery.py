"""delivery - what smtpfwdd's delivery process does with one spool file

DESCRIPTION
    Delivery(config, name).run() opens and locks the file (spool.py), runs
        mailprog -oi -f <sender> -- <recipient>...
    for at most MAXARGS arguments at a time, never through a shell, fed from
    the locked descriptor, and returns the exit status the master logs.
    A recipient with a leading '-' or an unquoted ',' (possible in a file
    of the C smtpd) never reaches the agent: it fails as unsafe.
OUTCOMES
    All delivered: the file is removed.  A batch the agent fails for good
    (a permanent exit status, or a temporary one whose words say waiting
    cannot help, e.g. "message file too big": HOPELESS): its recipients
    fail, the other batches are still tried.  A temporary failure (71 72 74
    75; 78, a missing agent, a signal or a timeout, with a CRIT line): the
    file is deferred (retried after RETRY_DELAY_TIME), unless it is older
    than QUEUE_LIFETIME, when every recipient still pending fails as
    expired (4.4.7).
    Failed recipients are reported to the sender in one delivery status
    notification (bounce.py), committed to the spool before anything else
    changes; then the file moves to failed/ with its reason, or, when other
    recipients are still pending, the reported ones are marked SENT so they
    are neither retried nor reported twice.  No notification goes to a null
    sender or to one unsafe on a command line: failed/ only, and a log line
    says so.  Once a message has waited DELAY_WARNING_TIME seconds (0: off),
    one "delayed" notification goes out; mode bit S_ISVTX records it.
SMTP AND LMTP
    With an agent smtp:... or lmtp:... (relay.py), the delivery process's
    Link sends the message instead, at most RCPTS_MAX recipients a
    transaction, and each recipient has its own answer: 2xx delivered,
    4xx deferred, 5xx failed with the MTA's reply as the notification's
    Diagnostic-Code (smtp; 550 5.1.1 ...).  When the message waits for
    some recipients, those delivered are marked SENT first, so a retry
    never repeats them.  A recipient the MTA never answered (down, hung,
    out of step) is deferred; if the end of the message had gone out, the
    MTA may have it already: the retry may deliver it twice, as Postfix's
    would.
"""

import os
import re
import select
import subprocess
import time

from smtpgate.forwarder import bounce, relay
import buildconf
from smtpgate import log, record
from smtpgate.text import visible
from smtpgate import spool, spooldir
from smtpgate.address import bare, xtext_decode

TEMPORARY = (os.EX_OSERR, os.EX_OSFILE, os.EX_IOERR, os.EX_TEMPFAIL)
# A temporary exit status that waiting cannot cure, told by the agent's own
# words: (pattern, RFC 3463 status, why).  Postfix's sendmail exits 75
# saying "message file too big", Exim says "message too big"; retrying them
# for QUEUE_LIFETIME would only keep the sender waiting for a bounce.
# (Postfix and Exim sort such failures into permanent classes too.)
HOPELESS = (
    (re.compile(r"\btoo (big|large)\b|\bexceeds? [\w ]{0,30}\b(size|limit)\b"
                r"|\bsize limit\b", re.IGNORECASE),
     "5.3.4", "the message is too big for the mail system"),
)
STDERR_MAX = 4096
# For the test suite only: "after-notify" kills the delivery process right
# after a notification is committed, before the original leaves the queue.


def hopeless_words(said):
    """(status, why) when the agent's words say that waiting cannot help,
    else None (see HOPELESS)."""
    for pattern, status, why in HOPELESS:
        if pattern.search(said):
            return status, why
    return None


def unquoted_comma(addr):
    """A ',' outside "quotes" (where backslash escapes the next character)."""
    quoted = escaped = False
    for ch in addr:
        if escaped:
            escaped = False
        elif ch == "\\" and quoted:
            escaped = True
        elif ch == '"':
            quoted = not quoted
        elif ch == "," and not quoted:
            return True
    return False


def check_recipient(r):
    """Why the C smtpd's recipient r must not reach sendmail, or None."""
    a = bare(r)
    if a.startswith("-"):
        return "recipient %s starts with '-'" % r
    if unquoted_comma(a):
        return "recipient %s has an unquoted ','" % r
    if not a:
        return "empty recipient"
    return None


def path(addr):
    """A stored address as SMTP's path: in angle brackets (a file of the C
    smtpd may hold one without)."""
    b = bare(addr)
    return "<>" if b in ("", "<>") else "<%s>" % b


def octets(text):
    """An argument as the spool's octets (its str is latin-1)."""
    return text if text.isascii() else text.encode("latin-1")


class Delivery:
    """The delivery process's work on one spool file (name: bytes)."""

    def __init__(self, config, name, link=None):
        self.config, self.name = config, visible(name)
        self.link = link            # relay.Link with an smtp: or lmtp: agent, else None
        self.path = os.path.join(os.fsencode(config.spooldir), name)
        self.f = None
        self.msg = None
        self.result = None          # sent, deferred or failed (the metrics)
        self.bounces = {"failed": 0, "delayed": 0}
        self.agent_status = self.agent_said = None     # the last call's, for the record

    def give_up_for_now(self):
        """After an unexpected error: defer the file so that it is not
        retried before RETRY_DELAY_TIME (a crash loop helps nobody)."""
        if self.f is not None:
            try:
                spool.defer(self.f)
            except OSError as e:
                log.crit("deferring %s: %s", self.name, e.strerror)

    def run(self):
        try:
            f = spool.open_for_delivery(self.path, time.time(), buildconf.RETRY_DELAY_TIME)
        except spool.Odd as e:
            log.err("%s: %s; skipped", self.name, e)
            return os.EX_NOPERM
        if f is None:
            log.debug("%s: busy or no longer eligible", self.name)
            return os.EX_TEMPFAIL
        self.f = f
        try:
            self.msg = spool.parse(f)
        except spool.Malformed as e:        # no sender we could trust: failed/ only
            return self.quarantine("malformed spool file: %s" % e, "?", [])
        sender = self.msg.sender.decode("latin-1")
        failed, safe = [], []
        for off, r in self.msg.recipients:
            r = r.decode("latin-1")
            why = check_recipient(r)
            if why:
                failed.append((off, bounce.Failure(r, bounce.UNSAFE, why)))
            else:
                safe.append((off, r))
        if self.link is not None:
            return self.relay(sender, safe, failed)
        return self.batches(sender, safe, failed)

    # -- smtp: and lmtp: --

    def relay(self, sender, rcpts, failed):
        """The message over the Link, per recipient (see SMTP AND LMTP)."""
        spec = self.link.spec
        done, pending, why, status, said, last = [], [], None, "4.0.0", "", None
        common = self.transaction_facts(sender, rcpts)
        for i in range(0, len(rcpts), relay.RCPTS_MAX):
            chunk = rcpts[i:i + relay.RCPTS_MAX]
            t = common._replace(rcpts=[(path(r), self.msg.dsn.get(off, "")) for off, r in chunk])
            try:
                replies, trouble = self.link.transfer(t)
            except relay.Trouble as e:
                self.link.close(polite=False)
                pending += rcpts[i:]
                why, status, said = e.why, e.status, e.why
                break
            for (off, r), reply in zip(chunk, replies):
                if reply is None:
                    pending.append((off, r))
                    why, status = trouble.why, trouble.status
                    if trouble.sent:
                        why += " after the end of the message went out: it may be delivered twice"
                    said = why
                    continue
                last = reply
                if reply.code < 400:
                    done.append((off, r))
                elif reply.code < 500:
                    pending.append((off, r))
                    why = said = "%s said to %s: %s" % (spec.text, r, reply)
                    status = reply.status()
                else:
                    failed.append((off, bounce.Failure(
                        r, reply.status(), str(reply), "%s said: %s" % (spec.text, reply),
                        kind="smtp")))
        self.agent_status = last.code if last is not None else None
        self.agent_said = str(last) if last is not None else said or None
        names = [r for _, r in done]
        if done and (pending or failed):
            spool.mark_sent(self.f, [off for off, _ in done])
        if pending:
            if names:
                why += " (delivered to %s)" % ", ".join(names)
            return self.defer(why, said, sender, pending, failed, status)
        if failed:
            return self.give_up(sender, failed, names)
        return self.delivered("delivered; %s said: %s" % (spec.text, last) if last is not None
                              else "delivered", sender, names)

    def delivered(self, what, sender, names):
        """Every recipient delivered: the file goes, and the outcome is logged."""
        if not spool.remove(self.path, self.f):
            log.alert("%s: the name no longer holds the file delivered; left alone",
                      self.name)
        spooldir.drop_deferral(self.config.spooldir, os.path.basename(self.path))
        self.outcome(what, sender, names)
        return os.EX_OK

    def transaction_facts(self, sender, rcpts):
        """What every transaction of this message says: a relay.Transaction
        without its recipients."""
        fd, msg = self.f.fileno(), self.msg
        size = os.fstat(fd).st_size - msg.body_offset
        headers = spool.headers(fd, msg.body_offset)
        eightbit = False
        os.lseek(fd, msg.body_offset, os.SEEK_SET)
        while not eightbit:
            chunk = os.read(fd, relay.CHUNK)
            if not chunk:
                break
            eightbit = not chunk.isascii()
        utf8_needed = msg.utf8 and not (sender.isascii() and headers.isascii()
                                        and all(r.isascii() for _, r in rcpts))
        return relay.Transaction(
            sender=path(sender), rcpts=[], fd=fd,
            body_offset=msg.body_offset, size=size, eightbit=eightbit,
            utf8_needed=utf8_needed, mail_dsn=msg.dsn.get("mail", ""),
            xforward=self.xforward(headers))

    def xforward(self, headers):
        """XFORWARD's attributes (Postfix): the client smtpd's own Received
        header names, and our queue id; None without that header."""
        got = spool.our_received(headers, os.path.basename(self.path))
        if got is None:
            return None
        helo, name, addr, proto = got["helo"], got["name"], got["addr"], got["proto"]
        return [("NAME", None if name in ("", "unknown") else name),
                ("ADDR", None if addr in ("", "unknown") else addr),
                ("HELO", helo if helo not in ("", "unknown") else None),
                ("PROTO", "ESMTP" if proto.startswith("ESMTP") else "SMTP"),
                ("IDENT", self.name), ("SOURCE", "REMOTE")]

    def argv(self, sender, batch, notify=None):
        """The agent's arguments; addresses as the octets stored (UTF-8
        after SMTPUTF8: Postfix's sendmail detects it), never re-encoded."""
        return [self.config.agent, "-oi", "-f", octets(bare(sender) or "<>")] \
            + self.dsn_flags(notify) + ["--"] + [octets(bare(r)) for _, r in batch]

    def dsn_flags(self, notify):
        """The sender's DSN wishes (RFC 3461) as Postfix's, Sendmail's and
        Exim's sendmail take them: -R full|hdrs, -V envid (decoded; only
        if printable and not beginning with "-"), -N for this call's
        recipients."""
        flags = []
        for word in self.msg.dsn.get("mail", "").split():
            key, _, value = word.partition("=")
            if key == "RET" and value in ("FULL", "HDRS"):
                flags += ["-R", value.lower()]
            elif key == "ENVID":
                envid = xtext_decode(value)     # (never one an agent might take for an option)
                if envid.isprintable() and envid.isascii() and not envid.startswith("-"):
                    flags += ["-V", envid]
        if notify:
            flags += ["-N", notify.lower()]
        return flags

    def notify_of(self, off):
        """NOTIFY of the recipient whose RCPT line is at off, or None."""
        for word in self.msg.dsn.get(off, "").split():
            if word.startswith("NOTIFY="):
                return word[7:]
        return None

    def batches(self, sender, rcpts, failed):
        """Calls of at most MAXARGS arguments; recipients with different
        NOTIFY in separate calls (their -N differs)."""
        groups = {}
        for off, r in rcpts:
            groups.setdefault(self.notify_of(off), []).append((off, r))
        calls = []
        for notify, group in groups.items():
            per_call = max(1, buildconf.MAXARGS - 5 - len(self.dsn_flags(notify)))
            calls += [(notify, group[i:i + per_call]) for i in range(0, len(group), per_call)]
        done, words = [], []
        while calls:
            (notify, batch), calls = calls[0], calls[1:]
            rcpts = [x for _, b in calls for x in b]
            status, why, said = self.call(self.argv(sender, batch, notify))
            self.agent_status, self.agent_said = status, visible(said, 300)
            names = [r for _, r in batch]
            if status == 0:
                done += names
                if said != why:         # it printed something (a queue id?)
                    words.append(visible(said, 300))
                if rcpts:
                    spool.mark_sent(self.f, [off for off, _ in batch])
                continue
            if done:
                why += " (delivered to %s)" % ", ".join(done)
            if status is None or status == os.EX_CONFIG:
                log.crit("%s: %s; deferred, fix the mail agent", self.name, why)
            code = bounce.status_of(status)
            hopeless = status in TEMPORARY and hopeless_words(said)
            if hopeless:
                code = hopeless[0]
                why += "; not retried: %s" % hopeless[1]
            elif status is None or status == os.EX_CONFIG or status in TEMPORARY:
                return self.defer(why, said, sender, batch + rcpts, failed,
                                  bounce.status_of(status, temporary=True))
            failed += [(off, bounce.Failure(r, code, said, why)) for off, r in batch]
        if failed:
            return self.give_up(sender, failed, done)
        return self.delivered("delivered" + ("; the agent said: %s" % " | ".join(words)
                                             if words else ""), sender, done)

    def call(self, argv):
        """Run the agent on the message, fed from the file we hold locked
        (never reopened by name); (exit status or None, why, its words)."""
        fd = spool.reader(self.f)
        try:
            os.lseek(fd, self.msg.body_offset, os.SEEK_SET)
            p = subprocess.Popen(argv, stdin=fd, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE, close_fds=True,
                                 env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
        except OSError as e:
            why = "cannot run %s: %s" % (argv[0], e.strerror)
            return None, why, why
        finally:
            os.close(fd)
        err = read_bounded(p.stderr, buildconf.AGENT_TIMEOUT)
        try:
            status = p.wait(max(1, buildconf.AGENT_TIMEOUT))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
            why = "%s took more than %d seconds; killed" % (argv[0], buildconf.AGENT_TIMEOUT)
            return None, why, why
        said = err.decode("latin-1", "replace").strip().replace("\n", " | ")
        if status < 0:
            why = "%s killed by signal %d" % (argv[0], -status)
        else:
            why = "%s exited %d" % (argv[0], status)
        if said:
            why += ", saying: " + said
        return (None if status < 0 else status), why, said or why

    # -- giving up, deferring, telling the sender --

    def defer(self, why, said, sender, pending, failed, status):
        arrival = self.msg.arrival
        age = None if arrival is None else time.time() - arrival
        if age is None or age > buildconf.QUEUE_LIFETIME:
            expiry = ("%s; no arrival date: not retried" % why if age is None
                      else "%s; undeliverable for %d days" % (why, age // 86400))
            failed += [(off, bounce.Failure(r, bounce.EXPIRED, "%s; %s" % (
                        said, "not retried" if age is None else "expired in the queue")))
                       for off, r in pending]
            return self.give_up(sender, failed, [], expiry)
        if failed:      # reported now, never retried nor reported again
            self.notify(sender, [self.wished(off, f) for off, f in failed])
            spool.mark_sent(self.f, [off for off, _ in failed])
        self.warn_if_delayed(sender, pending, said, status, age)
        spool.defer(self.f)
        spooldir.note_deferral(self.config.spooldir, os.path.basename(self.path), why)
        self.outcome("deferred: %s" % why, sender, [r for _, r in pending])
        return os.EX_TEMPFAIL

    def warn_if_delayed(self, sender, pending, said, status, age):
        wait = buildconf.DELAY_WARNING_TIME
        if not wait or age < wait or spool.warned(self.f):
            return
        until = self.msg.arrival + buildconf.QUEUE_LIFETIME
        self.notify(sender, [self.wished(off, bounce.Failure(r, status, said))
                             for off, r in pending],
                    action="delayed", until=until)
        spool.mark_warned(self.f)

    def give_up(self, sender, failed, done, why=None):
        """Tell the sender (committed first), then move the file to failed/."""
        why = why or "; ".join("%s: %s" % (f.rcpt, f.detail) for _, f in failed)
        if done:
            why += " (delivered to %s)" % ", ".join(done)
        self.notify(sender, [self.wished(off, f) for off, f in failed])
        return self.quarantine(why, sender, [f.rcpt for _, f in failed])

    def wished(self, off, failure):
        """failure with the DSN wishes of the recipient at off: its NOTIFY
        and ORCPT (RFC 3461), None where the sender gave none."""
        for word in self.msg.dsn.get(off, "").split():
            key, _, value = word.partition("=")
            if key == "NOTIFY":
                failure.notify = value
            elif key == "ORCPT":
                failure.orcpt = value
        return failure

    def notify(self, sender, failures, action="failed", until=None):
        """One delivery status notification to sender, into the spool: for
        the recipients whose NOTIFY asks for it (FAILURE, DELAY), or all
        that gave none."""
        wanted = "FAILURE" if action == "failed" else "DELAY"
        unwanted = [f for f in failures if f.notify and wanted not in f.notify.split(",")]
        if unwanted:
            log.info("%s: no %s notification for %s: NOTIFY=%s", self.name,
                     "delivery status" if action == "failed" else "delay",
                     ", ".join(f.rcpt for f in unwanted),
                     ",".join(sorted({f.notify for f in unwanted})))
            failures = [f for f in failures if f not in unwanted]
            if not failures:
                return None
        rcpts = ", ".join(f.rcpt for f in failures)
        if bare(sender) in ("", "<>"):
            log.info("%s: no notification for %s: the sender is null", self.name, rcpts)
            return None
        if check_recipient(sender):
            log.notice("%s: no notification for %s: the sender %s is unsafe for a "
                      "command line", self.name, rcpts, sender)
            return None
        headers = spool.headers(self.f.fileno(), self.msg.body_offset)
        envid = next((w[6:] for w in self.msg.dsn.get("mail", "").split()
                      if w.startswith("ENVID=")), None)
        data = bounce.report(self.config.myname, sender, failures, headers, self.msg.arrival,
                             self.name, action, until, envid=envid)
        name = bounce.queue(self.config.spooldir, sender, data, self.config.myname)
        self.bounces[action] += 1
        log.info("%s: %s notification %s to %s for %s", self.name,
                "delivery status" if action == "failed" else "delay", name, sender, rcpts)
        return name

    def quarantine(self, why, sender, names):
        dest = spooldir.quarantine(self.config.spooldir, os.path.basename(self.path), why)
        spooldir.drop_deferral(self.config.spooldir, os.path.basename(self.path))
        self.outcome("failed: %s; moved to %s" % (why, dest), sender, names)
        return os.EX_DATAERR

    def outcome(self, what, sender, names):
        """The one line per message: the spool id, sender, recipients, size
        and Message-ID (to find the message in the MTA's log), and what
        became of it."""
        self.result = "sent" if what.startswith("delivered") else \
            "deferred" if what.startswith("deferred") else "failed"
        size, msgid = self.described()
        if buildconf.SMTPD_LOG_FORMAT != "classic":
            arrival = self.msg.arrival if self.msg is not None else None
            log.info("%s", record.text("delivery", [
                ("id", self.name), ("message_id", msgid), ("from", sender), ("to", names),
                ("size", size), ("result", self.result), ("agent", self.config.agent),
                ("agent_status", self.agent_status), ("reply", self.agent_said),
                ("delay", None if arrival is None else round(time.time() - arrival, 3)),
                ("detail", what)], buildconf.SMTPD_LOG_FORMAT))
        elif self.config.quiet:
            log.info("%s from=%s%s size=%s message-id=%s status=%s", self.name, sender,
                    "".join(" to=%s" % n for n in names), size, msgid, what)
        else:
            log.info("%s from %s to %s, size=%s, message-id=%s: %s", self.name, sender,
                    ", ".join(names) or "-", size, msgid, what)

    def described(self):
        """(size of the message, its Message-ID) for the log; "?" and "-"
        when the file could not be parsed."""
        if self.msg is None:
            return "?", "-"
        size = os.fstat(self.f.fileno()).st_size - self.msg.body_offset
        return size, spool.message_id(spool.headers(self.f.fileno(), self.msg.body_offset))


def read_bounded(pipe, timeout):
    """Read a pipe to EOF keeping at most STDERR_MAX bytes."""
    kept = b""
    deadline = time.monotonic() + max(1, timeout)
    fd = pipe.fileno()
    while time.monotonic() < deadline:
        r, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not r:
            break
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        kept = (kept + chunk)[:STDERR_MAX]
    pipe.close()
    return kept
