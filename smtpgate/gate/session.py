"""session - one SMTP session of smtpd, on any pair of file descriptors

DESCRIPTION
    Session(config, engine, peer, conn).run() speaks SMTP until QUIT, EOF,
    a timeout, a deny rule or too many errors, and returns the exit status
    (spec 1.7).  inetd mode, the pre-forked workers and the tests run this
    same code.  Two records: Session (the peer, HELO, counters, I/O) and
    Envelope (sender, recipients, queue id), replaced by RSET and at the
    end of DATA.  What it says is chat.py's; whether a recipient passes,
    judge.py's; its filter stages filtering.py's.
PROTOCOL
    Only CRLF ends a line; a command line is at most 512 octets; bare CR,
    bare LF or NUL in a command gets 500 and the line is dropped.  DATA ends
    only at CRLF.CRLF; a bare CR or LF or a NUL anywhere in the message gets
    550 after reading to the end, a message over -s gets 552 after reading
    to the end.  The message is committed (fsync, rename) before the 250.
"""

import email.utils
import os
import re
import time
import traceback

import buildconf
from smtpgate import counters, log, metrics, record, spool, spooldir
from smtpgate.deadline import Deadline
from smtpgate.address import AddressError, bare, mail_params, parse_path, rcpt_params
from smtpgate.gate import chat, verify
from smtpgate.gate.filtering import Filtering
from smtpgate.gate.judge import Judge
from smtpgate.gate.channel import Channel, Closed, DataReader, header_oddity
from smtpgate.rules.ruleset import RuleError
from smtpgate.text import escape, host_chars



# ------------------------------------------------------------- session ----

class Envelope:
    def __init__(self, sender=None, name=None):
        self.sender = sender        # stored text, e.g. "<a@b>" or "<>"
        self.recipients = []
        self.name = name            # the spool id, drawn at MAIL for the milters
        self.discard = None         # the filter that said discard, if one did
        self.chunks = None          # BDAT: the message's DataReader while chunks come
        self.dsn = None             # DSN: "RET=.. ENVID=.." of MAIL, or None
        self.rcpt_dsn = []          # DSN: "NOTIFY=.. ORCPT=.." of each recipient, or None
        self.utf8 = False           # MAIL said SMTPUTF8: addresses and headers may be UTF-8
        self.refused = []           # the recipients refused: {rcpt, result, reason}


class Session(Filtering):
    """One SMTP session: config (config.GateConfig), engine (the rules, TLS
    and verification of the moment, engine.Engine), peer (peer.Peer: who
    the client is; peer.client is the rules' Client of it), conn
    (connection.Connection: the descriptors, on_end, greeted) and the
    session's deadline (deadline.Deadline).  Its filter stages are
    filtering.Filtering's."""

    def __init__(self, config, engine, peer, conn, deadline=None):
        self.config, self.engine, self.peer = config, engine, peer
        self.client = peer.client       # what the rules see
        self.greeted = conn.greeted     # inetd mode sends the 220 before loading
        self.accepted = conn.accepted or time.monotonic()
        # the connection's start: the front stage's accept, for a client it passed
        self.since = self.accepted - (conn.passed.age if conn.passed is not None else 0.0)
        if deadline is None:
            deadline = Deadline.after(buildconf.SESSION_TIMEOUT)
        self.ch = Channel(conn.rfd, conn.wfd, buildconf.READ_TIMEOUT, deadline, conn.sock,
                          conn.stress)
        self.passed = conn.passed       # handoff.Passed: the front stage began it (-D)
        if self.passed is not None:
            self.ch.unread(self.passed.unread)
        self.say = self.ch.say
        self.on_end = conn.on_end       # called once, before the last reply goes out
        self.on_message = conn.on_message
        self.keeper = conn.keeper       # the worker's kept filter connections, or None
        self.helo = None
        self.esmtp = False
        self.env = Envelope()
        self.errors = 0
        self.draft = None
        self.summary = []
        self.where = "%s(%s)" % (peer.name or "UNKNOWN", peer.ip_text or "")
        self.judge = Judge(engine.rules, self.client, self.verifier, self.where)
        self.milters = None         # milter.Milters, when filters are configured
        self.deadline = deadline
        self.received_header = b""
        self.form = buildconf.SMTPD_LOG_FORMAT     # classic, or the records' (record.py)
        self.last_helo = None
        self.ids = []               # the queue ids of the messages accepted
        self.refusals = 0           # recipients refused in the session

    # -- plumbing --
    # say(reply): a chat.Reply, batched until the next read, never an error:
    # the channel's own say (set in __init__: a call less per reply).

    def refuse(self, reply):
        """The reply to a refused command: it counts as an error."""
        self.ch.say(reply)
        self.count_error()

    def count_error(self):
        """One more error (refused commands, noto, tempfail): MAX_ERRORS end
        the session; past SMTPD_SOFT_ERRORS each further error reply waits
        SMTPD_ERROR_SLEEP seconds longer than the one before (within the
        session's time), so errors cost the client, not us."""
        self.errors += 1
        if self.errors >= buildconf.MAX_ERRORS:
            log.notice("too many errors from %s, closing", self.where)
            raise Closed(os.EX_PROTOCOL, "too many errors")
        over = self.errors - buildconf.SMTPD_SOFT_ERRORS
        if over > 0 and buildconf.SMTPD_ERROR_SLEEP and not self.peer.exempt:
            self.ch.sleep(over * buildconf.SMTPD_ERROR_SLEEP)

    def end(self):
        """The session is over: let go of what it holds elsewhere (the
        per-address count) before the client can read our last reply."""
        if self.on_end is not None:
            fn, self.on_end = self.on_end, None
            fn()

    def log(self, verbose, fragment):
        """A verbose syslog line, or a fragment of the -q summary line; at
        LOG_DEBUG for a balancer's health check (every few seconds, all
        day: mail.info in the syslog configuration drops them)."""
        if self.config.quiet:
            self.summary.append(fragment)
        else:
            self.routine("%s", verbose)

    def ident_where(self):
        """user@client, as the rule lines of the log name a client."""
        return "%s@%s" % (escape(self.client.ident or "UNKNOWN", 80), self.where)

    def whose(self):
        """What a verbose transaction line adds to the original's text, so
        that it can be followed: the client and the queue id."""
        return " client=%s id=%s" % (self.where, self.env.name)

    def flush_summary(self):
        if self.summary:
            self.routine("%s", "".join(self.summary).strip())
            self.summary = []

    def routine(self, fmt, *args):
        (log.debug if self.peer.health_check else log.info)(fmt, *args)

    def run(self):
        """Serve the session; return the exit status."""
        counters.add(counters.SESSIONS)
        try:
            self.dialogue()
        except Closed as c:
            status, last = c.status, None
            self.ending = str(c) or ("closed" if status != os.EX_OK else "quit")
            if status not in (os.EX_OK, os.EX_PROTOCOL) and str(c):
                self.log("%s from %s" % (c, self.where), " %s." % c)
            if status != os.EX_OK and c.last_word:
                last = chat.NOT_AVAILABLE
        except Exception:
            log.crit("unexpected error with %s: %s", self.where,
                    traceback.format_exc().replace("\n", " | "))
            self.ch.out = []
            status, last = os.EX_SOFTWARE, chat.LOCAL_ERROR
            self.ending = "software error"
        try:                            # the one ending: the last word, then goodbye
            if last is not None:
                self.ch.say(last)
            self.end()
            self.ch.flush(final=True)
            self.ch.close_tls()
        except Closed:
            pass
        finally:
            self.end()
            if self.draft is not None:
                self.draft.abort()
            self.judge.close()
            if self.milters is not None:
                self.milters.close()
            self.flush_summary()
            if self.form != "classic":
                self.session_record()
        if status != os.EX_OK or self.ch.unread_input():
            self.ch.linger()
        return status

    # -- what the metrics count and the records tell --

    def client_fields(self):
        p = self.peer
        tls = p.tls or (None, None)
        return [("client_addr", p.ip_text), ("client_name", p.name or "unknown"),
                ("helo", self.last_helo), ("tls_version", tls[0]), ("tls_cipher", tls[1]),
                ("dnsbl_score", p.score if self.engine.reputation is not None else None)]

    def session_record(self):
        """The one line per session (SMTPD_LOG_FORMAT logfmt or json)."""
        self.routine("%s", record.text("session", self.client_fields() + [
            ("messages", len(self.ids)), ("ids", self.ids[:100]),
            ("recipients_refused", self.refusals),
            ("seconds", round(time.monotonic() - self.since, 3)),
            ("end", getattr(self, "ending", "quit"))], self.form))

    def rcpt_outcome(self, rcpt, result, reason=""):
        """Count a RCPT's outcome; a refused one goes in the message's record."""
        counters.count(("smtpd_recipients", result, reason))
        if result != "accepted":
            self.refusals += 1
            if len(self.env.refused) < 100:
                self.env.refused.append({"rcpt": rcpt, "result": result, "reason": reason})

    def message_outcome(self, env, result, reason="", name=None, size=None, msgid=None):
        """Count what became of a message at the end of its DATA (or last
        BDAT); in logfmt or json, its one line.  True if that line was
        written (the classic one is not, then)."""
        counters.count(("smtpd_messages", result, reason))
        seconds = time.monotonic() - self.since
        if result == "accepted":
            metrics.observe(seconds)
            self.ids.append(name)
            if not reason and self.on_message is not None and self.peer.ip is not None:
                self.on_message(self.peer.ip)       # (a held message does not count)
        if self.form == "classic":
            return False
        verdicts = self.milters.verdicts if self.milters is not None else []
        self.routine("%s", record.text("message", [("id", name or env.name),
                                                    ("message_id", msgid)]
                                       + self.client_fields() + [
            ("from", env.sender), ("rcpts", len(env.recipients)), ("to", env.recipients),
            ("refused", env.refused or None),
            ("size", size), ("milter", [{"filter": f, "verdict": v} for f, v in verdicts]
                             or None),
            ("seconds", round(seconds, 3)), ("result", result), ("reason", reason or None)],
            self.form))
        return True

    def dialogue(self):
        """Greet, then read, check and dispatch commands until Closed."""
        self.greet()
        self.milter_connect()
        if self.passed is not None and self.passed.helo is not None:
            self.passed_hello(self.passed.helo, self.passed.esmtp)
        while True:
            line, problem = self.ch.command()
            if line is None:
                self.refuse(chat.BAD_LINE % problem)
                continue
            verb, _, arg = line.partition(" ")
            verb = verb.upper()
            if self.ends_group(verb) and self.ch.ready():
                raise self.out_of_sync(verb)
            VERBS.get(verb, Session.smtp_unknown)(self, arg)

    def greet(self):
        if self.greeted:
            return
        pause = buildconf.SMTPD_GREET_PAUSE
        if pause and not self.peer.exempt and self.passed is None:  # (it passed: no pause)
            said = self.pause(self.accepted + pause / 1000.0)
            if said is not None:
                raise self.early_talker(said)
        if self.peer.scoring is not None:
            self.judge_reputation()
        if buildconf.SMTPD_FORBID_UNAUTH_PIPELINING and self.ch.ready():
            raise self.out_of_sync("CONNECT")
        self.ch.say(chat.GREETING % self.config.myname)

    def pause(self, end):
        """The greeting pause until end (counted from the connection: the
        lookups before it count too), while the DNS lists answer: what the
        client said in it (None: nothing).  Cut short by a score that
        allow-lists."""
        s = self.peer.scoring
        while True:
            now = time.monotonic()
            if s is not None and s.done and self.engine.reputation.allowlisted(
                    self.engine.reputation.finish(s)):
                return None
            if now >= end:
                return None
            due = s is not None and s.waiting()
            if due:
                s.maybe_resend(now)
            said = self.ch.talks_within(min(end, s.resend_at()) - now if due else end - now,
                                        also=s.fileno() if due else None)
            if said is not None:
                return said
            if due:
                s.receive()

    def judge_reputation(self):
        """The DNS lists' score (waiting for what is due): at or above
        SMTPD_DNSBL_THRESHOLD 554 and closed; at or below a negative
        SMTPD_DNSBL_ALLOWLIST_THRESHOLD exempt from delays."""
        rep, s, ip = self.engine.reputation, self.peer.scoring, self.peer.ip_text
        score = rep.finish(s)
        self.peer.scored(score)
        if score >= rep.threshold:
            log.notice("dnsbl: refused %s: score %d (threshold %d): %s",
                       self.where, score, rep.threshold, s.detail())
            self.ch.say(chat.REPUTATION % ip)
            raise Closed(os.EX_PROTOCOL, "", last_word=False)
        if score:
            log.info("dnsbl: %s scores %d: %s%s", self.where, score, s.detail(),
                     " (allow-listed)" if rep.allowlisted(score) else "")
        if rep.allowlisted(score):
            self.peer.exempt = True

    def ends_group(self, verb):
        """Must the client wait for our reply to verb before it says more
        (and do we hold it to that, SMTPD_FORBID_UNAUTH_PIPELINING)?"""
        return (buildconf.SMTPD_FORBID_UNAUTH_PIPELINING and verb != "QUIT"
                and (verb in chat.ENDS_GROUP or not self.esmtp))

    def out_of_sync(self, after):
        """Input before the reply it had to wait for (RFC 2920 3.1; what
        spam engines and smuggling chains do): 554, one log line, closed;
        nothing of it is executed or spooled."""
        log.notice("improper command pipelining after %s from %s: %s", after, self.where,
                  escape(bytes(self.ch.buf[:60]).decode("latin-1"), 60))
        self.ch.say(chat.OUT_OF_SYNC)
        return Closed(os.EX_PROTOCOL, "", last_word=False)

    def early_talker(self, said):
        """A client that talked before our greeting: 554, one log line, closed;
        nothing it sent is executed."""
        if not said:
            return Closed(os.EX_OSERR, "EOF before the greeting", last_word=False)
        log.notice("pregreet: %s talked before the greeting: %s", self.where,
                  escape(said.decode("latin-1"), 60))
        self.ch.say(chat.PREGREET)
        return Closed(os.EX_PROTOCOL, "", last_word=False)

    # -- verbs --

    def smtp_helo(self, arg, esmtp=False):
        if self.helo is not None:
            self.env = Envelope()
            return self.refuse(chat.BAD_SEQUENCE)
        name = arg.strip()
        if self.config.paranoid and not re.match(r"^[\x21-\x7e]*$", name):
            raise Closed(os.EX_PROTOCOL, "suspicious HELO")
        if self.milters is not None:
            self.milter_values.update(self.tls_values())
            if self.milter_said(self.milters.helo(name), "HELO"):
                return
        self.hello(name, esmtp)
        pleased = chat.PLEASED % (self.config.myname, host_chars(name))
        if not esmtp:
            return self.say(pleased)
        self.say(pleased.with_lines(chat.keywords(self.config.maxsize, self.tls_offered())))

    def hello(self, name, esmtp):
        """The client said HELO (or EHLO) name and gets its 250: noted, logged."""
        self.helo, self.esmtp = name, esmtp
        self.last_helo = name
        self.ch.enhanced = chat.enhanced(esmtp)     # from the next reply on
        self.flush_summary()
        shown = escape(name)
        as_ = ' as "%s"' % shown if name.lower() != (self.peer.name or "").lower() else ""
        tls = self.ch.tls_info()
        self.log('%s from %s as "%s"' % ("EHLO" if esmtp else "HELO", self.where, shown),
                 "relay=%s/%s%s%s" % (self.peer.name or "UNKNOWN", self.peer.ip_text or "",
                                      as_, " tls=%s" % tls[0] if tls else ""))

    def passed_hello(self, name, esmtp):
        """The HELO or EHLO the front stage answered before it passed the
        client: the filters hear it now, and a refusal of theirs holds for
        every later command (milter.py), as one at CONNECT does."""
        if self.milters is not None:
            self.milter_values.update(self.tls_values())
            self.milter_said(self.milters.helo(name), "HELO", reply=False)
        self.hello(name, esmtp)

    def tls_offered(self):
        return self.engine.tls_context is not None and self.ch.tls is None

    def smtp_starttls(self, arg):
        """RFC 3207: 220, then the handshake; what the client pipelined
        behind STARTTLS is discarded, and the session starts over."""
        if self.engine.tls_context is None:
            return self.smtp_unknown(arg)
        if arg.strip():
            return self.refuse(chat.STARTTLS_SYNTAX)
        if self.ch.tls is not None or self.helo is None:
            return self.refuse(chat.BAD_SEQUENCE)
        self.say(chat.STARTING_TLS)
        self.ch.flush()
        try:
            dropped = self.ch.start_tls(self.engine.tls_context)
        except Closed as e:
            log.notice("TLS handshake with %s failed: %s", self.where, e)
            counters.count(("smtpd_tls_sessions", "failed"))
            raise Closed(os.EX_PROTOCOL, "") from None
        if dropped:
            log.notice("discarded %d octets that %s sent after STARTTLS, before TLS",
                      dropped, self.where)
        version, cipher = self.peer.tls = self.ch.tls_info()
        counters.count(("smtpd_tls_sessions", version if version in metrics.TLS_VERSIONS
                        else "other"))
        self.flush_summary()
        if not self.config.quiet:
            log.info("STARTTLS with %s: %s with cipher %s", self.where, version, cipher)
        self.helo, self.esmtp, self.env = None, False, Envelope()
        self.ch.enhanced = False

    def smtp_ehlo(self, arg):
        self.smtp_helo(arg, esmtp=True)

    def address(self, arg, keyword, null_ok, utf8=False):
        """'FROM:<a> params' -> (stored, params) or None after replying."""
        if not arg[:len(keyword)].upper() == keyword:
            self.refuse(chat.SYNTAX_ADDRESS % keyword)
            return None
        try:
            return parse_path(arg[len(keyword):].lstrip(" "), null_ok, utf8)
        except AddressError as e:
            log.notice("refused address %s from %s: %s", escape(arg), self.where, e.text)
            if self.config.paranoid:
                raise Closed(os.EX_PROTOCOL, "suspicious address") from None
            self.refuse(chat.Reply(e.code, e.text, detail=e.detail or (
                "5.1.7" if keyword == "FROM:" else "5.1.3")))
            return None

    def mail_params(self, params):
        """SIZE=, BODY=, DSN's RET= and ENVID=, SMTPUTF8 after EHLO: (the DSN
        ones as their envelope text or None, SMTPUTF8 said), or None (replied)."""
        if params and not self.esmtp:
            self.refuse(chat.SYNTAX)
            return None
        try:
            got = mail_params(params, dsn=bool(buildconf.SMTPD_DSN),
                              utf8=bool(buildconf.SMTPD_SMTPUTF8))
        except AddressError as e:
            self.refuse(chat.BAD_DSN % e.text if e.code == 501 else chat.BY_CODE[e.code])
            return None
        if self.config.maxsize and got.get("SIZE", 0) > self.config.maxsize:
            self.say(chat.TOO_BIG)
            return None
        return (" ".join("%s=%s" % (k, got[k]) for k in ("RET", "ENVID") if k in got) or None,
                got.get("SMTPUTF8", False))

    def smtp_mail(self, arg):
        if self.helo is None or self.env.sender is not None:
            return self.refuse(chat.BAD_SEQUENCE)
        # SMTPUTF8 (RFC 6531) lets the address itself be UTF-8: look ahead
        utf8 = bool(buildconf.SMTPD_SMTPUTF8) and self.esmtp and "SMTPUTF8" in arg.upper().split()
        parsed = self.address(arg, "FROM:", null_ok=True, utf8=utf8)
        got = None if parsed is None else self.mail_params(parsed[1])
        if got is None:
            return
        dsn, utf8 = got
        if not (utf8 or parsed[0].isascii()):       # (the look-ahead was fooled)
            return self.refuse(chat.Reply(553, "SMTPUTF8 is required for a UTF-8 address "
                                               "(RFC 6531)", detail="5.6.7"))
        self.env = Envelope(parsed[0], spool.new_name())    # its queue id, from now on
        self.env.dsn, self.env.utf8 = dsn, utf8
        if self.milters is not None:
            sender = "" if parsed[0] == "<>" else bare(parsed[0])
            self.milter_values.update({"i": self.env.name, "{mail_addr}": sender})
            if self.milter_said(self.milters.mail(["<%s>" % sender] + parsed[1].split()),
                                "MAIL"):
                self.env = Envelope()
                return self.milters.abort()
        shown = escape(parsed[0])
        if self.config.quiet:
            self.summary.append(" from=%s" % shown)
        else:
            self.routine("mail from %s%s", shown, self.whose())
        self.say(chat.SENDER_OK % parsed[0])

    def smtp_rcpt(self, arg):
        if self.env.sender is None:
            return self.refuse(chat.BAD_SEQUENCE)
        parsed = self.address(arg, "TO:", null_ok=False, utf8=self.env.utf8)
        if parsed is None:
            return self.rcpt_outcome(escape(arg[3:].strip()[:256]), "refused", "syntax")
        rcpt, params = parsed
        if params and not self.esmtp:
            self.rcpt_outcome(rcpt, "refused", "syntax")
            return self.refuse(chat.UNKNOWN_PARAMETER)
        try:
            got = rcpt_params(params, dsn=bool(buildconf.SMTPD_DSN))
        except AddressError as e:
            self.rcpt_outcome(rcpt, "refused", "syntax")
            return self.refuse(chat.BAD_DSN % e.text if e.code == 501 else chat.UNKNOWN_PARAMETER)
        if len(self.env.recipients) >= buildconf.MAX_RCPT:
            self.rcpt_outcome(rcpt, "tempfail", "limit")
            return self.say(chat.TOO_MANY_RECIPIENTS)
        if self.check_rules(rcpt) and not self.milter_refused(rcpt, params):
            self.rcpt_outcome(rcpt, "accepted")
            self.env.recipients.append(rcpt)
            self.env.rcpt_dsn.append(" ".join("%s=%s" % (k, got[k]) for k in ("NOTIFY", "ORCPT")
                                              if k in got) or None)
            shown = escape(rcpt)
            if self.config.quiet:
                self.summary.append(" to=%s" % shown)
            else:
                self.routine("Recipient %s%s", shown, self.whose())
            self.say(chat.RECIPIENT_OK % rcpt)

    def check_rules(self, rcpt):
        """Apply the rules (spec 3.7); True if the recipient is allowed.
        A noto or a 451 counts as an error; a delay never outlasts the
        session deadline."""
        try:
            v = self.judge.rules(self.env.sender, rcpt)
        except RuleError as e:
            log.err("%s", str(e).replace("\n", "; "))
            self.rcpt_outcome(rcpt, "tempfail", "rules")
            self.ch.say(chat.RULES_INVALID)
            self.count_error()
            return False
        if v.debug:
            for r in v.debug:
                log.info("DEBUG: matched %s for %s from %s to %s", r.where,
                         self.ident_where(), escape(self.env.sender), escape(rcpt))
        v = self.judge.verified(v, rcpt)
        if v.action == "allow":
            return True
        self.rcpt_outcome(rcpt, "tempfail" if v.action in ("tempfail", "verify") else "refused",
                          "verify" if v.action == "verify" or v.detail == "recipient verification"
                          else "rules")
        who, shown = self.ident_where(), (escape(self.env.sender), escape(rcpt))
        log.info("%s from %s to %s: %s by %s%s", who, shown[0], shown[1], v.action,
                v.rule.where if v.rule else "lookup failure" if v.action == "tempfail"
                else "default", " (%s)" % v.detail if v.detail else "")
        if v.delay:
            log.info("sleeping for a %s_delay of %d seconds", v.action, v.delay)
            self.ch.flush()
            self.ch.sleep(v.delay)
        self.ch.say(chat.policy(v.reply, "4.4.3" if v.action == "tempfail" else "4.7.1"))
        if v.action == "deny":
            self.log("Forbidden FROM or RCPT for host %s - abandoning" % self.where,
                     " forbidden FROM or RCPT")
            raise Closed(os.EX_PROTOCOL, "denied")
        if v.action == "noto":
            self.log("Discarded bad recipient %s%s" % (shown[1], self.whose()),
                     " discarded bad recipient=%s" % shown[1])
        self.count_error()
        return False

    def verifier(self):
        """The session's callouts (verify.py), made at the first verify rule."""
        return verify.Verifier(self.config.verify_backend, self.config.myname,
                               self.deadline, self.engine.verify_cache)

    # (The filters' stages -- milter_connect, milter_said, milter_refused,
    # milter_judge -- are filtering.py's: they judge after the rules.)

    def smtp_data(self, arg):
        if not self.env.recipients or self.env.chunks is not None:
            return self.refuse(chat.BAD_SEQUENCE)   # (no DATA inside BDAT's transaction)
        if arg.strip():
            return self.refuse(chat.SYNTAX)
        if not self.start_message():
            return
        if self.ends_group("DATA") and self.ch.ready():
            raise self.out_of_sync("DATA")  # again: text sent while a filter answered
        self.ch.say(chat.START_DATA)
        self.ch.flush()
        reader = DataReader(self.ch, self.draft.write, self.config.maxsize)
        reader.run()
        self.finish_data(reader)

    def start_message(self):
        """DATA or the first BDAT: the filters' DATA stage, then the draft
        with our Received header; False if refused (replied)."""
        if self.draft is not None:      # one left by a transaction reset mid-BDAT
            self.draft.abort()
            self.draft = None
        if self.milters is not None and self.milter_said(self.milters.data(), "DATA"):
            self.env = Envelope()
            self.milters.abort()
            return False
        try:
            env = self.env
            self.draft = spool.Draft(self.config.spooldir, env.sender.encode("latin-1"),
                                     [r.encode("latin-1") for r in env.recipients],
                                     name=env.name, anonymous=True,
                                     dsn=None if env.dsn is None and not any(env.rcpt_dsn)
                                     else (env.dsn, env.rcpt_dsn), utf8=env.utf8)
            self.received_header = self.received()
            self.draft.write(self.received_header)
        except OSError as e:
            log.crit("creating spool file in %s: %s", self.config.spooldir, e.strerror)
            raise Closed(os.EX_CANTCREAT, "cannot create spool file") from None
        return True

    def smtp_bdat(self, arg):
        """RFC 3030: BDAT size [LAST].  The chunk's octets are read in any
        case (the client sends them without waiting); they are the
        message as sent -- no dot-stuffing, no terminator; CRLF is stored
        as LF like DATA's lines, a bare LF or CR is data.  The last chunk
        ends the message as DATA's dot does."""
        if not (self.esmtp and buildconf.SMTPD_CHUNKING):
            return self.smtp_unknown(arg)
        m = BDAT_ARGS.match(arg)
        if m is None:
            return self.refuse(chat.SYNTAX)     # (no size: we cannot stay in step)
        size, last = int(m.group(1)), m.group(2) is not None
        env = self.env
        if not env.recipients or (env.chunks is None and not self.start_message()):
            self.ch.step("DATA")
            self.ch.skip(size)
            return self.refuse(chat.BAD_SEQUENCE) if not env.recipients else None
        if env.chunks is None:
            env.chunks = DataReader(self.ch, self.draft.write, self.config.maxsize)
            env.chunks.cr = False
        reader = env.chunks
        self.ch.step("DATA")
        self.ch.take(size, lambda data: chunk_lines(reader, data))
        if not last:
            if reader.problem:      # the transaction failed: the client should stop
                self.finish_data(reader)
                return
            return self.say(chat.CHUNK_OK % size)
        if reader.cr:
            reader.write(b"\r")
        self.finish_data(reader)

    def finish_data(self, reader):
        env, self.env = self.env, Envelope()
        try:
            self.finish_message(env, reader)
        finally:
            if self.draft is not None:
                self.draft.abort()
                self.draft = None
            if self.milters is not None:
                self.milters.abort()

    def finish_message(self, env, reader):
        problem = reader.problem
        if not problem and self.config.paranoid and header_oddity(reader.headers):
            self.message_outcome(env, "refused", "headers", size=reader.size)
            raise Closed(os.EX_PROTOCOL, "unprintable characters in headers")
        if problem == "bare":
            what, line = reader.bare
            log.notice("message from %s refused: %s in line %d", self.where, what, line)
            self.message_outcome(env, "refused", "bare_line_ending", size=reader.size)
            return self.say(chat.BARE % (what, line))
        if problem:
            log.notice("message from %s refused: %s", self.where, problem)
            if problem == "size":
                log.err("message body exceeds maximum size of %d", self.config.maxsize)
                self.message_outcome(env, "refused", "size", size=reader.size)
                return self.say(chat.STORAGE_EXCEEDED)
            self.message_outcome(env, "tempfail", "data", size=reader.size)
            return self.say(chat.NO_STORAGE)
        held = None
        if self.milters is not None:
            judged = self.milter_judge(env)
            if judged is not None:
                return judged
            held = self.milters.held
        try:
            name = self.draft.commit(into=spooldir.HOLD_DIR if held else None,
                                     sync=self.engine.dir_sync)
        except OSError as e:
            log.err("committing spool file: %s", e.strerror)
            self.message_outcome(env, "tempfail", "spool", size=reader.size)
            return self.say(chat.NO_STORAGE)
        self.draft = None
        counters.add(counters.MESSAGES)
        counters.add(counters.MESSAGE_BYTES, reader.size)
        if held:
            spooldir.note_hold(self.config.spooldir, name, held)
        msgid = spool.message_id(bytes(reader.headers))
        if self.message_outcome(env, "accepted", "held" if held else "", name, reader.size,
                                msgid):
            self.flush_summary()
            return self.say(chat.ACCEPTED)
        self.log("Received %d bytes of message body from %s as %s for %d recipients, "
                 "message-id=%s%s" % (reader.size, self.where, name, len(env.recipients), msgid,
                                      " (held: %s)" % held if held else ""),
                 " bytes=%d id=%s message-id=%s%s" % (reader.size, name, msgid,
                                                     " held" if held else ""))
        self.flush_summary()
        self.say(chat.ACCEPTED)

    def received(self):
        """smtpd's trace header (RFC 5322 form; RFC 3848 "ESMTPS" after
        STARTTLS, with the protocol version and cipher in a comment line).
        smtpfwdd dates a message by the line after "id NAME;"."""
        c = self.peer
        helo = host_chars(self.helo or "")
        tls = self.ch.tls_info()
        return ("Received: from %s (%s [%s])\n%s\tby %s (smtpd) with %s id %s;\n\t%s\n"
                % (helo or "unknown", c.name or "unknown", c.ip_text or "unknown",
                   "\t(version=%s cipher=%s)\n" % tls if tls else "", self.config.myname,
                   "ESMTPS" if tls else "ESMTP" if self.esmtp else "SMTP", self.draft.name,
                   email_date())).encode("latin-1")

    def smtp_rset(self, arg):
        self.env = Envelope()
        self.say(chat.OK)

    def smtp_noop(self, arg):
        self.say(chat.OK)

    def smtp_vrfy(self, arg):
        self.say(chat.CANNOT_VRFY)

    def smtp_expn(self, arg):
        self.refuse(chat.NOT_IMPLEMENTED)

    def smtp_help(self, arg):
        self.say(chat.HELP % " ".join(chat.listed(self.tls_offered())))

    def smtp_quit(self, arg):
        self.say(chat.CLOSING)
        raise Closed(os.EX_OK)

    def smtp_unknown(self, arg):
        self.refuse(chat.UNRECOGNIZED)

    def smtp_proxy(self, arg):
        """A PROXY header from a client that is not a trusted proxy (-X): a
        protocol error, never a way to claim another address."""
        log.notice("PROXY header from %s, which is not a trusted proxy: refused",
                  self.where)
        self.refuse(chat.UNRECOGNIZED)


BDAT_ARGS = re.compile(r"^([0-9]{1,18})(?: +(LAST))? *$", re.I)


def chunk_lines(reader, data):
    """A BDAT chunk into the message: CRLF stored as LF (one split across
    chunks too), every other octet as sent."""
    if reader.cr:
        data = b"\r" + data
    reader.cr = data.endswith(b"\r")
    if reader.cr:
        data = data[:-1]
    if data:
        reader.write(data.replace(b"\r\n", b"\n"))


VERBS = {"HELO": Session.smtp_helo, "EHLO": Session.smtp_ehlo,
         "MAIL": Session.smtp_mail, "RCPT": Session.smtp_rcpt,
         "DATA": Session.smtp_data, "BDAT": Session.smtp_bdat, "RSET": Session.smtp_rset,
         "NOOP": Session.smtp_noop, "VRFY": Session.smtp_vrfy,
         "EXPN": Session.smtp_expn, "HELP": Session.smtp_help,
         "QUIT": Session.smtp_quit, "STARTTLS": Session.smtp_starttls,
         "PROXY": Session.smtp_proxy}


_DATE = [None, ""]


def email_date():
    """Now as an RFC 5322 date, made once a second (it names seconds only;
    5 us of formatting a message saved)."""
    now = int(time.time())
    if _DATE[0] != now:
        _DATE[0], _DATE[1] = now, email.utils.formatdate(now, localtime=True)
    return _DATE[1]
