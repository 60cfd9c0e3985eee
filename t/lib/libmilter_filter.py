"""t/libmilter_filter.py PORT - a filter on Sendmail's own libmilter (Debian's
python3-milter), run by /usr/bin/python3: libmilter's state machine, not
ours, decides what the client may send.  At the end of each message it
adds X-Libmilter: N CLIENT (N counts the messages of this process) and
continues, or accepts if the body says ACCEPTME, or rejects a message
whose body says REJECTME."""

import sys

import Milter

count = [0]


class Filter(Milter.Base):
    def __init__(self):
        self.client, self.bad, self.accept = "?", False, False

    def connect(self, hostname, family, hostaddr):
        self.client = hostaddr[0] if hostaddr else "?"
        return Milter.CONTINUE

    def envfrom(self, sender, *params):
        self.bad = self.accept = False
        return Milter.CONTINUE

    def body(self, chunk):
        self.bad = self.bad or b"REJECTME" in chunk
        self.accept = self.accept or b"ACCEPTME" in chunk
        return Milter.CONTINUE

    def eom(self):
        count[0] += 1
        if self.bad:
            self.setreply("550", "5.7.1", "rejected by libmilter")
            return Milter.REJECT
        self.addheader("X-Libmilter", "%d %s" % (count[0], self.client))
        return Milter.ACCEPT if self.accept else Milter.CONTINUE


if __name__ == "__main__":
    Milter.factory = Filter
    Milter.set_flags(Milter.ADDHDRS)
    print("ready", flush=True)
    Milter.runmilter("smtpgate-test", "inet:%s@127.0.0.1" % sys.argv[1], 60)
