"""Recipient verification (issue 18): "verify" rules ask a real Postfix on
loopback (a private instance whose local users are its alias map) whether a
recipient exists; answers are cached, shared and bounded; callouts are
capped; a noto or deny rule still wins first."""

import os
import re
import smtplib
import socket
import sqlite3
import subprocess
import threading
import time

import pytest

import postfix
from smtpgate import net
from smtpgate.gate import verify
from harness import free_port, PYTHON, ROOT, wait_for

pytestmark = pytest.mark.skipif(not postfix.available(), reason="needs root and Debian's postfix")
RULES = ("noto:ALL:ALL:blocked@localhost:550 blocked by the rules\n"
         "verify:ALL:ALL:*@localhost\n"
         "noto:ALL:ALL:ALL:551 no relaying\n")


@pytest.fixture(scope="module")
def backend():
    port = free_port()
    main = {"smtpd_peername_lookup": "no", "smtpd_banner": "$myhostname ESMTP backend"}
    with postfix.instance(users=["known", "blocked"], listen={port: "smtpd"}, main=main) as mta:
        deadline = time.time() + 20
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.2)
        mta.port = port
        yield mta


def callouts(mta):
    """How many SMTP connections the backend has taken so far."""
    return len(re.findall(r"postfix-test/smtpd\[\d+\]: connect from", mta.log()))


def rcpt(port, address, source="127.0.0.1"):
    """The reply to RCPT TO:<address> in a session of its own."""
    with smtplib.SMTP("127.0.0.1", port, timeout=60, source_address=(source, 0)) as s:
        s.ehlo("client.example")
        s.mail("alice@example.org")
        return s.rcpt(address)


def gate(daemon_, mta, *flags, **constants):
    return daemon_(RULES, "-V", "127.0.0.1:%d" % mta.port, *flags, **constants).wait_ready()


def test_known_and_unknown_users(daemon_, backend):
    d = gate(daemon_, backend)
    assert rcpt(d.port, "known@localhost")[0] == 250
    code, text = rcpt(d.port, "nosuch@localhost")
    assert (code, text) == (550, b"5.1.1 <nosuch@localhost>: Recipient address rejected: "
                                 b"User unknown")
    assert wait_for(lambda: "User unknown in local recipient table" in d.log())  # logged only


def test_a_rule_still_wins_before_any_callout(daemon_, backend):
    d = gate(daemon_, backend)
    before = callouts(backend)
    assert rcpt(d.port, "blocked@localhost") == (550, b"5.7.1 blocked by the rules")
    assert rcpt(d.port, "someone@elsewhere.example") == (551, b"5.7.1 no relaying")
    time.sleep(0.5)
    assert callouts(backend) == before


def test_backend_down_is_a_temporary_failure(daemon_):
    port = free_port()                  # nothing listens there
    d = daemon_(RULES, "-V", "127.0.0.1:%d" % port).wait_ready()
    code, text = rcpt(d.port, "known@localhost")
    assert code == 451 and text.startswith(b"4.4.3 <known@localhost>")
    assert "cannot verify known@localhost" in d.log()


def test_defer_ok_accepts_when_the_backend_is_down(daemon_):
    port = free_port()
    d = daemon_(RULES, "-V", "127.0.0.1:%d" % port, SMTPD_VERIFY_DEFER_OK=1).wait_ready()
    assert rcpt(d.port, "known@localhost")[0] == 250
    assert "accepting known@localhost unverified" in d.log()


def test_a_backend_that_never_answers_times_out(daemon_):
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(5)                    # accepts, never says a word
    try:
        d = daemon_(RULES, "-V", "127.0.0.1:%d" % silent.getsockname()[1],
                    SMTPD_VERIFY_TIMEOUT=1).wait_ready()
        t0 = time.monotonic()
        assert rcpt(d.port, "known@localhost")[0] == 451
        assert time.monotonic() - t0 < 5
        assert "backend timed out" in d.log()
    finally:
        silent.close()


def test_no_backend_configured_never_lets_mail_through(daemon_):
    d = daemon_(RULES).wait_ready()
    assert rcpt(d.port, "known@localhost")[0] == 451
    assert "no backend is configured" in d.log()


def test_cache_answers_again_without_a_callout_and_is_shared(daemon_, backend):
    d = gate(daemon_, backend, "-M", "4", SMTPD_PREFORK=2)
    assert rcpt(d.port, "known@localhost")[0] == 250
    assert rcpt(d.port, "nosuch2@localhost")[0] == 550
    n = callouts(backend)
    # Two sessions at once are two workers; neither asks again.
    first = smtplib.SMTP("127.0.0.1", d.port, timeout=30)
    second = smtplib.SMTP("127.0.0.1", d.port, timeout=30)
    try:
        for s in (first, second):
            s.ehlo("x")
            s.mail("alice@example.org")
        assert first.rcpt("known@localhost")[0] == 250
        assert second.rcpt("nosuch2@localhost")[0] == 550
        assert second.rcpt("known@LOCALHOST")[0] == 250     # a domain has no case
    finally:
        first.quit()
        second.quit()
    assert len({l.split("[")[1].split("]")[0] for l in d.log().splitlines()
                if "worker: EHLO from" in l}) >= 2          # two workers served
    time.sleep(0.5)
    assert callouts(backend) == n


def test_cache_expires_after_its_ttl(daemon_, backend):
    d = gate(daemon_, backend, SMTPD_VERIFY_POSITIVE_TTL=2, SMTPD_VERIFY_NEGATIVE_TTL=2)
    assert rcpt(d.port, "known@localhost")[0] == 250
    n = callouts(backend)
    assert rcpt(d.port, "known@localhost")[0] == 250
    assert callouts(backend) == n
    time.sleep(2.5)
    assert rcpt(d.port, "known@localhost")[0] == 250
    assert wait_for(lambda: callouts(backend) == n + 1)


def test_one_connection_per_session_reused_and_callouts_capped(daemon_, backend):
    d = gate(daemon_, backend, SMTPD_VERIFY_MAX=5)
    n = callouts(backend)
    with smtplib.SMTP("127.0.0.1", d.port, timeout=60) as s:
        s.ehlo("x")
        s.mail("alice@example.org")
        codes = [s.rcpt("random%d@localhost" % i)[0] for i in range(8)]
    assert codes[:5] == [550] * 5 and codes[5:] == [450] * 3
    assert callouts(backend) == n + 1                    # one connection for all five


def test_a_broken_cache_degrades_to_no_cache(daemon_, backend):
    d = daemon_(RULES, "-V", "127.0.0.1:%d" % backend.port)
    with open(os.path.join(d.jail, "verify.db"), "wb") as f:
        f.write(b"this is not an sqlite database" * 100)
    d.wait_ready()
    assert rcpt(d.port, "known@localhost")[0] == 250
    assert rcpt(d.port, "nosuch3@localhost")[0] == 550
    assert wait_for(lambda: "verification cache /" in d.log() and "going on without it"
                    in d.log())


def test_cache_is_bounded(tmp_path, monkeypatch):
    import buildconf
    monkeypatch.setattr(buildconf, "SMTPD_VERIFY_CACHE_SIZE", 50)
    cache = verify.Cache(str(tmp_path / "v.db"))
    for i in range(500):
        cache.put("user%d@localhost" % i, 250 if i % 2 else 550, 1000.0 + i)
    rows = sqlite3.connect(str(tmp_path / "v.db")).execute(
        "SELECT count(*) FROM verified").fetchone()[0]
    assert rows == 50
    assert cache.get("user499@localhost", 1000.0) == 250       # the newest stay
    assert cache.get("user1@localhost", 1000.0) is None


def test_the_tester_shows_and_performs_verification(backend, tmp_path):
    rules = tmp_path / "rules"
    rules.write_text(RULES)

    def cli(*args):
        p = subprocess.run([PYTHON, os.path.join(ROOT, "checkrules.py"), "-f", str(rules),
                            "-n", "UNKNOWN"] + list(args), capture_output=True, text=True,
                           timeout=60)
        return p.returncode, p.stdout.splitlines()
    assert cli("<a@b.example>", "<known@localhost>") == (4, ["verify"])
    v = "127.0.0.1:%d" % backend.port
    assert cli("-V", v, "<a@b.example>", "<known@localhost>") == (0, ["allow"])
    status, out = cli("-v", "-V", v, "<a@b.example>", "<nosuch@localhost>")
    assert status == 1 and out[0] == ("noto 550 5.1.1 <nosuch@localhost>: Recipient address "
                                      "rejected: User unknown")
    assert out[1].startswith("backend: 550 5.1.1 <nosuch@localhost>") and "local recipient" in out[1]
    assert cli("-V", v, "<a@b.example>", "<blocked@localhost>")[0] == 1


def test_lmtp_backend(tmp_path):
    """An in-test LMTP server: LHLO, not EHLO."""
    seen = []
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)

    def serve():
        conn, _ = server.accept()
        f = conn.makefile("rwb")
        f.write(b"220 lmtp ready\r\n")
        f.flush()
        for line in f:
            seen.append(line.strip())
            verb = line[:4].upper()
            f.write(b"250-x\r\n250 ok\r\n" if verb == b"LHLO" else
                    b"550 no\r\n" if b"nosuch" in line else b"221 bye\r\n" if verb == b"QUIT"
                    else b"250 ok\r\n")
            f.flush()
            if verb == b"QUIT":
                break
        conn.close()
    threading.Thread(target=serve, daemon=True).start()
    v = verify.Verifier(net.parse_backend("lmtp:127.0.0.1:%d" % server.getsockname()[1]),
                        "gate.example", None, None)
    assert v.check("<known@x>") is None
    assert v.check("<nosuch@x>").startswith("550 5.1.1")
    v.close()
    assert seen == [b"LHLO gate.example", b"MAIL FROM:<>", b"RCPT TO:<known@x>",
                    b"RCPT TO:<nosuch@x>", b"QUIT"]      # one transaction, reused
    server.close()


@pytest.mark.parametrize("text", ["127.0.0.1", "localhost:25", "127.0.0.1:0", "lmtp:[::1]:x"])
def test_bad_backends_are_refused(text):
    with pytest.raises(ValueError):
        net.parse_backend(text)
    assert net.parse_backend("lmtp:[::1]:24") == (True, "::1", 24)


# (issue 21, item 4) - verification: a local part is case-sensitive --

class CaseSensitiveBackend:
    """An SMTP backend that knows only Alice@my.domain, exactly so."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", free_port()))
        self.port = self.sock.getsockname()[1]
        self.asked = []
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self.session, args=(conn,), daemon=True).start()

    def session(self, conn):
        f = conn.makefile("rwb", buffering=0)
        f.write(b"220 backend\r\n")
        for line in f:
            cmd = line.strip().decode()
            if cmd.upper().startswith("RCPT TO:"):
                addr = cmd[8:].strip("<>")
                self.asked.append(addr)
                f.write(b"250 ok\r\n" if addr == "Alice@my.domain" else b"550 no\r\n")
            elif cmd.upper() == "QUIT":
                f.write(b"221 bye\r\n")
                break
            else:
                f.write(b"250 ok\r\n")
        conn.close()


def rcpts(port, *addresses):
    import smtplib
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        s.ehlo("client.example")
        s.mail("sender@example.org")
        return [s.rcpt(a)[0] for a in addresses]


def test_the_verification_cache_keeps_the_local_parts_case(daemon_):
    backend = CaseSensitiveBackend()
    d = daemon_("verify:ALL:ALL:ALL\n", "-V", "127.0.0.1:%d" % backend.port).wait_ready()
    assert rcpts(d.port, "Alice@my.domain") == [250]
    # The same session's memo and the shared cache both keep them apart...
    assert rcpts(d.port, "alice@my.domain", "ALICE@MY.DOMAIN", "Alice@MY.DOMAIN") == \
        [550, 550, 250]
    assert backend.asked == ["Alice@my.domain", "alice@my.domain", "ALICE@MY.DOMAIN"]
    # ... and the domain's case never matters: answered from the cache.
    assert rcpts(d.port, "Alice@My.Domain", "alice@my.DOMAIN") == [250, 550]
    assert len(backend.asked) == 3
    backend.sock.close()
