"""Real servers on loopback for the tests: DNS (dnspython answers) and ident."""

import socket
import socketserver
import threading

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset


class DNSServer:
    """A UDP DNS server on 127.0.0.1 answering from a dict.

    zone[name][rdtype] = [rdata text, ...] or the string "SERVFAIL",
    "TIMEOUT" or "TRUNCATE" (an empty answer with TC); zone[name] may itself
    be one of those.  A name "*.z." answers for every name below z. that the
    zone lacks.  Names not in the zone are NXDOMAIN unless a longer name ends
    in them; an NXDOMAIN carries the SOA of the longest apex (apex()) that
    ends the name, if any."""

    def __init__(self, addr="127.0.0.1", port=0):
        self.zone = {}
        self.apexes = set()
        self.queries = []
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((addr, port))
        self.addr, self.port = self.sock.getsockname()
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    @property
    def spec(self):
        return "%s@%d" % (self.addr, self.port)

    def add(self, name, rdtype, *values):
        name = name.lower().rstrip(".") + "."
        self.zone.setdefault(name, {})
        if isinstance(self.zone[name], dict):
            self.zone[name].setdefault(rdtype, [])
            self.zone[name][rdtype] += list(values)

    def apex(self, name):
        self.apexes.add(name.lower().rstrip(".") + ".")

    def fail(self, name, how="SERVFAIL", rdtype=None):
        name = name.lower().rstrip(".") + "."
        if rdtype is None:
            self.zone[name] = how
        else:
            self.zone.setdefault(name, {})[rdtype] = how

    def serve(self):
        while True:
            try:
                data, peer = self.sock.recvfrom(4096)
            except OSError:
                return
            try:
                reply = self.answer(dns.message.from_wire(data))
            except Exception:       # a broken query: ignore it
                continue
            if reply is not None:
                self.sock.sendto(reply.to_wire(), peer)

    def answer(self, q):
        question = q.question[0]
        name = question.name.to_text().lower()
        rdtype = dns.rdatatype.to_text(question.rdtype)
        self.queries.append((name, rdtype))
        r = dns.message.make_response(q)
        r.flags |= dns.flags.RA
        entry = self.zone.get(name)
        if entry is None:
            wild = [k for k in self.zone if k.startswith("*.") and name.endswith(k[1:])]
            entry = self.zone[max(wild, key=len)] if wild else None
        if entry is None:
            if not any(k.endswith("." + name) for k in self.zone):
                r.set_rcode(dns.rcode.NXDOMAIN)
                apex = [a for a in self.apexes if name == a or name.endswith("." + a)]
                if apex:
                    r.authority.append(dns.rrset.from_text(
                        max(apex, key=len), 300, "IN", "SOA",
                        "ns.test. hostmaster.test. 1 3600 600 86400 300"))
            return r
        how = entry if isinstance(entry, str) else entry.get(rdtype)
        if how == "TIMEOUT":
            return None
        if how == "SERVFAIL":
            r.set_rcode(dns.rcode.SERVFAIL)
            return r
        if how == "TRUNCATE":
            r.flags |= dns.flags.TC
            return r
        if how:
            rrset = dns.rrset.from_text_list(question.name, 300, "IN", rdtype, how)
            r.answer.append(rrset)
        return r

    def close(self):
        self.sock.close()


class _IdentHandler(socketserver.StreamRequestHandler):
    def handle(self):
        line = self.rfile.readline(1024).decode("latin-1")
        self.server.queries.append(line)
        user = self.server.user
        if user is None:
            return
        try:
            a, b = [int(x) for x in line.split(",")]
        except ValueError:
            return
        if callable(user):
            self.wfile.write(user(a, b).encode("latin-1"))
        else:
            self.wfile.write(b"%d , %d : USERID : UNIX :%s\r\n" % (a, b, user.encode()))


class IdentServer(socketserver.ThreadingTCPServer):
    """An RFC 1413 server on addr:port answering with user (or a function
    of the two ports returning the whole reply; None: close silently)."""

    allow_reuse_address = True
    daemon_threads = True

    def __init__(self, addr, port, user=None):
        self.user = user
        self.queries = []
        super().__init__((addr, port), _IdentHandler)
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.shutdown()
        self.server_close()
