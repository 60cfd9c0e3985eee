"""judge - may this recipient pass?  The rules, then verification, in one place

DESCRIPTION
    Judge(rules, client, verifier) judges the recipients of one session (or
    of checkrules): rules(sender, rcpt) is the rules file's Verdict (the
    rules engine, rules/ruleset.py: allow, noto, deny, tempfail or verify);
    verified(verdict, rcpt) settles a verify one by asking the backend
    (verify.py): its refusal becomes a noto (a 5xx) or a tempfail (a 4xx),
    its yes an allow; recipient() is both.  verifier is a function that
    makes the session's verify.Verifier when one is first needed, or None
    (checkrules without -V): then a verify Verdict stays one.
    The session asks it at RCPT and then its filters about what it allowed
    (filtering.py); a recipient or a sender a filter adds is asked of it
    again (admits, for rewrite.py): the filters never let in what the rules
    or the backend would refuse, and never hear of what they refused.
"""

from smtpgate.rules.ruleset import evaluate, RuleError, Verdict


class Judge:
    def __init__(self, rules, client, verifier=None, where=""):
        self.rules_of = rules           # .get() -> the compiled rules (RuleError)
        self.client = client            # the rules' Client
        self.make_verifier = verifier
        self.verifier = None
        self.where = where              # the client, for the log

    def rules(self, sender, rcpt):
        """The rules' Verdict for this sender and recipient; RuleError."""
        return evaluate(self.rules_of.get(), self.client, sender, rcpt)

    def verified(self, v, rcpt):
        """A verify Verdict settled by the backend (or left as it is)."""
        if v.action != "verify" or self.make_verifier is None:
            return v
        if self.verifier is None:
            self.verifier = self.make_verifier()
        refusal = self.verifier.check(rcpt, self.where)
        if refusal is None:
            return Verdict("allow", rule=v.rule, debug=v.debug)
        kind = "noto" if refusal.startswith("5") else "tempfail"
        return Verdict(kind, refusal, v.rule, 0, v.debug, "recipient verification")

    def recipient(self, sender, rcpt):
        return self.verified(self.rules(sender, rcpt), rcpt)

    def admits(self, sender, rcpt):
        """Would the rules (and the backend) allow it?  No reply, no delay:
        only an allow passes (a filter's recipient or sender, rewrite.py)."""
        try:
            return self.recipient(sender, rcpt).action == "allow"
        except RuleError:
            return False

    def close(self):
        if self.verifier is not None:
            self.verifier.close()
