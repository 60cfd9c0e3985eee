"""peer - who the client is: every fact the gate learns of it, in one record

DESCRIPTION
    Peer is one connection's client as the gate knows it, declared here
    field by field instead of patched onto the rules' Client: the two ends
    of the connection (the client's from a trusted proxy's PROXY header
    when there is one, client.py), how we know (origin), the forward-
    confirmed name and the PTR name, the exemptions, the DNS lists'
    scoring and score, TLS once it is up.  connection.identify() makes it
    before the greeting; the session, the filters (their macros) and the
    logs read it; the rules engine sees only the rules' Client made of it
    (rules_client), which carries the score too once the greeting is out.
"""

import dataclasses

from smtpgate.gate.client import peer_ip
from smtpgate.rules.ruleset import Client


@dataclasses.dataclass
class Peer:
    local: tuple = None         # (address, port) of our end, or None
    remote: tuple = None        # (address, port) of the client, or None
    ip: object = None           # its address (ipaddress), None if none (not a socket)
    ip_text: str = None         # the same as text
    origin: str = None          # None (the socket), "proxy" (its header), "health" (LOCAL)
    name: str = None            # the forward-confirmed host name, or None
    name_error: str = None      # why the name could not be had (a TempFail), or None
    ptr: str = None             # the PTR name, confirmed or not (milters' {client_ptr})
    exempt: bool = False        # in SMTPD_ADMISSION_EXEMPT, or allow-listed by the DNS lists
    scoring: object = None      # dnsbl.Scoring while the DNS lists answer, or None
    score: int = 0              # the DNS lists' score, once the greeting is out
    tls: tuple = None           # (version, cipher) after STARTTLS
    client: object = None       # the rules' Client of it (rules_client)

    @property
    def health_check(self):
        """The trusted proxy's own connection (PROXY LOCAL): no client."""
        return self.origin == "health"

    @classmethod
    def of(cls, local, remote, origin=None, scoring=None):
        ip = peer_ip(remote)
        return cls(local=local, remote=remote, ip=ip, ip_text=str(ip) if ip else None,
                   origin=origin, scoring=scoring)

    @classmethod
    def around(cls, client):
        """The Peer of a rules' Client made elsewhere (a session run in
        this very process: the fuzzers, some tests)."""
        return cls(remote=(client.ip_text, 0) if client.ip is not None else None,
                   ip=client.ip, ip_text=client.ip_text, name=client.name,
                   name_error=client.name_error, client=client)

    def rules_client(self, lookup, ident, ident_fn):
        """Make (and keep) the rules' Client of this peer."""
        self.client = Client(self.ip, self.name, lookup, ident=ident, ident_fn=ident_fn,
                             name_error=self.name_error)
        self.client.score = self.score
        return self.client

    def scored(self, score):
        """The DNS lists' score: for the session and for DNSBL= tokens."""
        self.score = self.client.score = score
