"""filtering - what a session asks of its mail filters, and does with their answers

DESCRIPTION
    Filtering is the part of session.Session that speaks to the filters
    (milter.py) at each stage, kept in a module of its own: the connect with
    Postfix's macros, a filter's answer turned into our reply and log line
    (milter_said), the RCPT asked after the rules, and the end of the
    message, whose changes become a new draft (rewrite.py) that the session
    commits as it would have the first.  A recipient or sender a filter adds
    passes the rules and verification first (judge.py, admits).
"""

import os

from smtpgate import log
from smtpgate.address import bare
from smtpgate.gate import chat, milter, rewrite
from smtpgate.gate.channel import Closed
from smtpgate.text import escape


class Filtering:
    """Session's filter stages (a mixin: it uses the session's config,
    client, channel, envelope, draft and counters)."""

    def milter_connect(self):
        """Open the session's filters and report the client to them."""
        if not self.config.milters:
            return
        c, ip = self.peer, self.peer.ip_text or ""
        peer, local = c.remote, c.local
        self.milter_values = {
            "j": self.config.myname, "{daemon_name}": self.config.myname, "v": "smtpgate",
            "{daemon_addr}": local and local[0], "{daemon_port}": local and local[1],
            "_": "%s [%s]" % (c.name or "unknown", ip or "unknown"),
            "{client_addr}": ip or None, "{client_port}": peer and peer[1],
            "{client_name}": c.name or "unknown", "{client_ptr}": c.ptr or "unknown"}
        self.milters = milter.Milters(self.config.milters, self.config.milter_default,
                                      self.deadline, self.milter_values,
                                      self.keeper or milter.NOT_KEEPING)
        family = b"U" if not ip else b"6" if ":" in ip else b"4"
        self.milter_said(self.milters.connect(c.name or "[%s]" % ip, family,
                                              peer[1] if peer else 0, ip),
                         "CONNECT", reply=False)

    def tls_values(self):
        tls = self.ch.tls_info()
        return {"{tls_version}": tls and tls[0], "{cipher}": tls and tls[1],
                "{cipher_bits}": tls and self.ch.tls.cipher()[2]}

    def milter_said(self, a, stage, rcpt=None, reply=True):
        """Act on a filter's Answer a at stage; True if it refused the
        command (its reply given, an error counted).  discard marks the
        envelope; shutdown ends the session.  A refusal at CONNECT is given
        to every later command instead (milter.py)."""
        if a.kind == "continue":
            return False
        shown = "from=%s to=%s" % (escape(self.env.sender or ""), escape(rcpt) if rcpt else
                                   ",".join(escape(r) for r in self.env.recipients[:5]))
        if a.kind == "discard":
            log.info("milter-discard: %s from %s: %s; %s (milter %s)", stage, self.where,
                     "the message will be discarded", shown, a.source)
            self.env.discard = a.source
            return False
        log.info("milter-reject: %s from %s: %s; %s (milter %s)", stage, self.where,
                 a.reply.last_line(), shown, a.source)      # (a reply milter.py made printable)
        if a.kind == "shutdown":
            self.ch.say(a.reply)
            raise Closed(os.EX_PROTOCOL, "", last_word=False)
        if reply:
            self.ch.say(a.reply)
            self.count_error()
        return True

    def milter_refused(self, rcpt, params=""):
        """After the rules allowed rcpt: do the filters refuse it?  They
        see its ESMTP parameters (DSN's NOTIFY, ORCPT) as Postfix passes
        them: further arguments of the RCPT packet."""
        if self.milters is None:
            return False
        self.milter_values["{rcpt_addr}"] = bare(rcpt)
        a = self.milters.rcpt(["<%s>" % bare(rcpt)] + params.split())
        if self.milter_said(a, "RCPT", rcpt):
            self.rcpt_outcome(rcpt, "tempfail" if milter.verdict(a) == "tempfail"
                              else "refused", "milter")
            return True
        return False

    def milter_judge(self, env):
        """The end of the message: the filters judge the draft; their
        changes are written over it, or to a new draft (rewrite.py).  A
        change of the envelope or the body is logged; added headers, every
        message's with rspamd, are not (nor are they by Postfix).  None to
        commit, or after a reply (refused, discarded)."""
        draft = self.draft
        if env.discard is None:
            draft.flush()
            msg = rewrite.Message(draft.fd, draft.body_offset + len(self.received_header),
                                  os.fstat(draft.fd).st_size, (env.sender, env.recipients),
                                  self.judge.admits, self.config.spooldir, self.config.maxsize)
            msg.utf8 = env.utf8
            if env.dsn is not None or any(env.rcpt_dsn):
                msg.dsn = (env.dsn, {r: d for r, d in reversed(list(zip(env.recipients,
                                                                         env.rcpt_dsn)))})
            try:
                a = self.milters.message(msg)
                if a.kind == "continue" and msg.changed:
                    if not msg.rewrite(draft, self.received_header):
                        self.draft = msg.write(draft.name, self.received_header)
                        draft.abort()
                    if (msg.sender, msg.recipients) != (env.sender, list(env.recipients)):
                        log.info("milter: %s envelope changed by the filters: from=%s, "
                                 "%d recipients", draft.name, escape(msg.sender),
                                 len(msg.recipients))
                    if msg.replaced is not None:
                        log.info("milter: %s body replaced by the filters", draft.name)
            except OSError as e:
                log.err("writing the filtered message %s: %s", draft.name, e.strerror)
                self.message_outcome(env, "tempfail", "spool")
                return self.say(chat.NO_STORAGE)
            finally:
                msg.close()
            self.env = env      # for milter_said's log line
            try:
                if a.kind != "continue" and self.milter_said(a, "END-OF-MESSAGE", reply=False):
                    self.message_outcome(env, "tempfail" if milter.verdict(a) == "tempfail"
                                         else "refused", "milter")
                    self.ch.say(a.reply)
                    return True
            finally:
                self.env = type(env)()
        if env.discard is not None:
            log.info("message %s from %s discarded (milter %s): from=%s, %d recipients",
                     draft.name, self.where, env.discard, escape(env.sender),
                     len(env.recipients))
            self.message_outcome(env, "discarded", "milter")
            self.flush_summary()
            self.say(chat.ACCEPTED)
            return True
        return None
