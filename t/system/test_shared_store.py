"""Several gates, one memory (issue 26): rates and caches shared through a
private redis-server; Redis down, back, stalling or answering garbage."""

import hashlib
import hmac
import os
import re
import socketserver
import threading
import time

import pytest

import redisd
from harness import ROOT, wait_for

pytestmark = pytest.mark.skipif(not redisd.available() or os.geteuid() != 0,
                                reason="needs root and Debian's redis-server")
KEY = "0123456789abcdef-signing-key"
RULES = "verify:ALL:ALL:*@localhost\nallow:ALL:ALL:ALL\n"


@pytest.fixture
def redis():
    r = redisd.RedisServer().start()
    yield r
    r.close()


def secrets(tmp_path, key=KEY, password=redisd.PASSWORD, mode=0o600):
    path = tmp_path / "shared-store.secret"
    path.write_text("# the gates' secrets\nkey %s\npassword %s\n" % (key, password))
    os.chmod(path, mode)
    return str(path)


class Backend(socketserver.ThreadingTCPServer):
    """An MTA to verify against: known (known@localhost) exists; counts RCPTs."""

    allow_reuse_address = True
    daemon_threads = True

    def __init__(self, known="known@localhost"):
        self.rcpts, self.known = [], b"<%s>" % known.encode()
        super().__init__(("127.0.0.1", 0), BackendSession)
        self.port = self.server_address[1]
        threading.Thread(target=self.serve_forever, daemon=True).start()


class BackendSession(socketserver.StreamRequestHandler):
    def handle(self):
        self.wfile.write(b"220 backend\r\n")
        for line in self.rfile:
            verb = line[:4].upper()
            if verb == b"RCPT":
                self.server.rcpts.append(line.strip())
                self.wfile.write(b"250 ok\r\n" if self.server.known in line
                                 else b"550 5.1.1 no such user\r\n")
            elif verb == b"QUIT":
                self.wfile.write(b"221 bye\r\n")
                return
            else:
                self.wfile.write(b"250 ok\r\n")


@pytest.fixture
def backend():
    b = Backend()
    yield b
    b.shutdown()
    b.server_close()


def gates(daemon_, port, tmp_path, n=2, rules="allow:ALL:ALL:ALL\n", flags=(), **constants):
    """n gates sharing the Redis on port.  Its calls may take a second here
    (a busy host): only the tests of timeouts ask for the 50 ms bound."""
    constants.setdefault("SMTPD_SHARED_STORE", "redis://127.0.0.1:%d/3" % port)
    constants.setdefault("SMTPD_SHARED_STORE_TIMEOUT", 1000)
    if "SMTPD_SHARED_STORE_SECRETS" not in constants:
        constants["SMTPD_SHARED_STORE_SECRETS"] = secrets(tmp_path)
    return [daemon_(rules, *flags, **constants).wait_ready() for _ in range(n)]


def greet(d, source):
    c = d.connect(source)
    code = c.code()
    if code == 220:
        c.cmd("QUIT")
    c.close()
    return code


def rcpt(d, address, source="127.0.0.1"):
    c = d.connect(source)
    assert c.code() == 220
    c.cmd("HELO client.example")
    c.cmd("MAIL FROM:<a@example.org>")
    code = c.cmd("RCPT TO:<%s>" % address)[0]
    c.cmd("QUIT")
    c.close()
    return code


def test_the_rate_limit_holds_across_gates(daemon_, redis, tmp_path):
    g1, g2 = gates(daemon_, redis.port, tmp_path, SMTPD_MAX_RATE=4)
    assert [greet(g1, "127.0.0.9"), greet(g2, "127.0.0.9"), greet(g1, "127.0.0.9"),
            greet(g2, "127.0.0.9")] == [220] * 4
    assert greet(g1, "127.0.0.9") == 421
    assert greet(g2, "127.0.0.9") == 421
    assert greet(g2, "127.0.0.10") == 220       # another network
    keys = redis.keys("smtpd:rate:*")
    assert b"smtpd:rate:00000000000000000000ffff7f000009" in keys, keys


def test_a_second_site_under_another_prefix_counts_alone(daemon_, redis, tmp_path):
    g1, = gates(daemon_, redis.port, tmp_path, n=1, SMTPD_MAX_RATE=2)
    g2, = gates(daemon_, redis.port, tmp_path, n=1, SMTPD_MAX_RATE=2,
                SMTPD_SHARED_STORE_PREFIX="othersite:")
    assert [greet(g1, "127.0.0.9"), greet(g1, "127.0.0.9")] == [220, 220]
    assert greet(g2, "127.0.0.9") == 220
    assert greet(g1, "127.0.0.9") == 421


def test_a_recipient_verified_at_one_gate_is_known_at_the_other(daemon_, redis, backend,
                                                                tmp_path):
    g1, g2 = gates(daemon_, redis.port, tmp_path, rules=RULES,
                   flags=("-V", "127.0.0.1:%d" % backend.port),
                   SMTPD_VERIFY_CACHE="")       # no sqlite: only Redis can remember
    assert rcpt(g1, "known@localhost") == 250
    assert rcpt(g1, "nosuch@localhost") == 550
    assert len(backend.rcpts) == 2
    assert rcpt(g2, "known@localhost") == 250
    assert rcpt(g2, "nosuch@localhost") == 550
    assert len(backend.rcpts) == 2              # answered from Redis
    assert rcpt(g2, "known@LocalHost") == 250   # the local cache's keys: domain folded
    assert len(backend.rcpts) == 2


def test_a_forged_entry_lets_no_unknown_user_in(daemon_, redis, backend, tmp_path):
    from smtpgate.gate import verify
    g1, = gates(daemon_, redis.port, tmp_path, n=1, rules=RULES,
                flags=("-V", "127.0.0.1:%d" % backend.port), SMTPD_VERIFY_CACHE="")
    key = b"smtpd:verify:" + verify.Cache.key("intruder@localhost").hex().encode()
    payload = b"250 %d" % (time.time() + 3600)
    redis.command("SET", key, payload + b" " + b"0" * 32)                  # no signature
    wrong = hmac.new(b"another site's key!", key + b"\0" + payload,
                     hashlib.sha256).hexdigest()[:32].encode()
    key2 = b"smtpd:verify:" + verify.Cache.key("stranger@localhost").hex().encode()
    redis.command("SET", key2, payload + b" " + wrong)
    assert rcpt(g1, "intruder@localhost") == 550
    assert rcpt(g1, "stranger@localhost") == 550
    assert len(backend.rcpts) == 2              # both asked of the backend
    assert "is not signed with this gate's key; ignored" in g1.log()


def test_redis_killed_under_load_then_back(daemon_, redis, tmp_path):
    g1, g2 = gates(daemon_, redis.port, tmp_path, SMTPD_MAX_RATE=3)
    assert greet(g1, "127.0.0.9") == 220
    redis.kill()
    t0 = time.monotonic()
    codes = [greet(g, "127.0.0.20") for g in (g1, g2) for _ in range(4)]
    took = time.monotonic() - t0
    # each gate alone: three sessions, then its own limit; none waited on Redis
    assert codes == [220, 220, 220, 421, 220, 220, 220, 421], codes
    assert took < 4, took
    for g in (g1, g2):
        log = g.log()
        assert log.count("using this gate's own state until it answers") == 1, log
    redis.start()
    time.sleep(1.2)                             # the next try comes within a second
    assert greet(g1, "127.0.0.40") == 220       # each gate finds Redis back
    assert greet(g2, "127.0.0.40") == 220
    shared = [greet(g1, "127.0.0.50"), greet(g2, "127.0.0.50"), greet(g1, "127.0.0.50"),
              greet(g2, "127.0.0.50")]
    assert shared == [220, 220, 220, 421], shared
    assert wait_for(lambda: all("answers again: sharing state" in g.log() for g in (g1, g2)))


class Hostile(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True

    def __init__(self, how):
        self.how = how
        super().__init__(("127.0.0.1", 0), HostileSession)
        self.port = self.server_address[1]
        threading.Thread(target=self.serve_forever, daemon=True).start()


class HostileSession(socketserver.BaseRequestHandler):
    def handle(self):
        how = self.server.how
        self.request.settimeout(30)
        try:
            while True:
                data = self.request.recv(65536)
                if not data:
                    return
                if how == "garbage":
                    self.request.sendall(b"\x16\x03\x01 this is not RESP\r\n")
                elif how == "huge":
                    self.request.sendall(b"$99999999999\r\n")
                elif how == "error":
                    self.request.sendall(b"-OOM command not allowed when used memory > "
                                         b"'maxmemory'.\r\n" * 3)
                elif how == "huge-array":       # 200 strings of 896 KiB: 175 MB
                    self.request.sendall(b"*200\r\n")
                    for _ in range(200):
                        self.request.sendall(b"$917504\r\n" + b"x" * 917504 + b"\r\n")
                elif how == "nested":
                    self.request.sendall(b"*1\r\n" * 100 + b":1\r\n")
                elif how == "many":             # arrays of arrays of 1000 each
                    self.request.sendall(b"*1000\r\n" * 3 + b":1\r\n" * 1000000)
                # "stall": read, never answer
        except OSError:
            return


@pytest.mark.parametrize("how,said", [("garbage", "garbage"), ("stall", "timed out after 50 ms"),
                                      ("huge", "a reply of 99999999999 octets"),
                                      ("error", "OOM command not allowed"),
                                      ("huge-array", "reply over 1048576 octets"),
                                      ("nested", "arrays nested more than 2 deep"),
                                      ("many", "a reply of more than 1024 elements")])
def test_redis_answering_garbage_or_stalling_is_bounded_and_logged(daemon_, tmp_path, how,
                                                                   said):
    h = Hostile(how)
    try:
        g, = gates(daemon_, h.port, tmp_path, n=1, SMTPD_MAX_RATE=3,
                   SMTPD_SHARED_STORE_TIMEOUT=50)
        t0 = time.monotonic()
        codes = [greet(g, "127.0.0.9") for _ in range(4)]
        assert codes == [220, 220, 220, 421]        # the gate's own limit
        assert time.monotonic() - t0 < 2
        log = g.log()
        assert re.search(r"shared store redis://127\.0\.0\.1:\d+/3: (AUTH|EVALSHA): .*%s"
                         % re.escape(said), log), log
        assert log.count("using this gate's own state") == 1
    finally:
        h.shutdown()
        h.server_close()


def test_a_signed_entry_that_claims_too_long_a_life_is_ignored(daemon_, redis, backend,
                                                               tmp_path):
    """Issue 34, item 4: an entry signed with the gates' key (a compromised
    worker holds it) is believed only within the TTL the gate itself would
    give: a "user exists" valid for ten years is a forgery."""
    from smtpgate.gate import verify
    g1, = gates(daemon_, redis.port, tmp_path, n=1, rules=RULES,
                flags=("-V", "127.0.0.1:%d" % backend.port), SMTPD_VERIFY_CACHE="",
                SMTPD_VERIFY_POSITIVE_TTL=3600)
    for who, life in (("intruder", 10 * 365 * 86400), ("recent", 1800)):
        key = b"smtpd:verify:" + verify.Cache.key(who + "@localhost").hex().encode()
        payload = b"250 %d" % (time.time() + life)
        mac = hmac.new(KEY.encode(), key + b"\0" + payload, hashlib.sha256).hexdigest()[:32]
        redis.command("SET", key, payload + b" " + mac.encode())
    assert rcpt(g1, "intruder@localhost") == 550        # asked of the backend
    assert rcpt(g1, "recent@localhost") == 250          # within the TTL: believed
    assert backend.rcpts == [b"RCPT TO:<intruder@localhost>"]


def test_an_acl_user_that_reaches_only_our_keys_and_commands(daemon_, tmp_path):
    """Issue 34, item 4: the gates log in as the ACL user etc/redis-acl.conf
    ships (named in the URL, its password in the secrets file) and work as
    with the default user; what a compromised worker holds -- that user and
    password -- can neither reconfigure Redis nor touch other keys."""
    line = next(l for l in open(os.path.join(ROOT, "etc", "redis-acl.conf"))
                if l.startswith("user "))
    acl = line.strip().replace(">CHANGE-THIS-PASSWORD", ">gate-password-1")
    r = redisd.RedisServer(acl=[acl]).start()
    try:
        url = "redis://smtpd-gate@127.0.0.1:%d/3" % r.port
        g1, g2 = gates(daemon_, r.port, tmp_path, SMTPD_MAX_RATE=2, SMTPD_SHARED_STORE=url,
                       SMTPD_SHARED_STORE_SECRETS=secrets(tmp_path, password="gate-password-1"))
        assert [greet(g1, "127.0.0.9"), greet(g2, "127.0.0.9"), greet(g1, "127.0.0.9")] \
            == [220, 220, 421]
        assert "using this gate's own state" not in g1.log() + g2.log()
        assert r.keys("smtpd:rate:*")
        worker = ("smtpd-gate", "gate-password-1")
        for cmd in (("CONFIG", "SET", "maxmemory", "1"), ("FLUSHALL",), ("KEYS", "*"),
                    ("GET", "otherapp:secret"), ("SET", "otherapp:x", "1"),
                    ("EVAL", "return redis.call('CONFIG', 'GET', 'dir')", "0")):
            answer = r.command(*cmd, auth=worker)
            assert isinstance(answer, bytes) and answer.startswith((b"-NOPERM", b"-ERR")), \
                (cmd, answer)
        assert r.command("CONFIG", "GET", "maxmemory") == [b"maxmemory", b"0"]
    finally:
        r.close()


def test_the_dnsbl_score_is_shared(daemon_, redis, dnsz, tmp_path):
    dnsz.add("9.0.0.127.bl.test", "A", "127.0.0.2")
    g1, g2 = gates(daemon_, redis.port, tmp_path, SMTPD_DNSBL_SITES="bl.test")
    assert greet(g1, "127.0.0.9") == 554
    assert greet(g2, "127.0.0.9") == 554
    assert len([q for q in dnsz.queries if q[0] == "9.0.0.127.bl.test."]) == 1
    # a forged "clean" score in Redis is ignored
    key = b"smtpd:dnsbl:" + bytes([127, 0, 0, 8]).hex().encode()
    redis.command("SET", key, b"-100 %d " % (time.time() + 3600) + b"f" * 32)
    dnsz.add("8.0.0.127.bl.test", "A", "127.0.0.2")
    assert greet(g2, "127.0.0.8") == 554


def test_a_client_that_passed_one_gates_pause_skips_the_others(daemon_, redis, tmp_path):
    """The front stage's allow-list (issue 37) is shared: a client that
    waited out the greeting pause at one gate is greeted at once by the
    other; a forged entry in Redis lets nobody skip it."""
    g1, g2 = gates(daemon_, redis.port, tmp_path, SMTPD_GREET_PAUSE=1500)
    started = time.monotonic()
    assert greet(g1, "127.0.0.9") == 220
    assert time.monotonic() - started >= 1.2
    started = time.monotonic()
    assert greet(g2, "127.0.0.9") == 220
    assert time.monotonic() - started < 1.0
    assert redis.command("EXISTS", b"smtpd:pass:" + bytes([127, 0, 0, 9]).hex().encode())
    key = b"smtpd:pass:" + bytes([127, 0, 0, 8]).hex().encode()
    redis.command("SET", key, b"1 %d " % (time.time() + 3600) + b"f" * 32)
    started = time.monotonic()
    assert greet(g2, "127.0.0.8") == 220
    assert time.monotonic() - started >= 1.2


def test_a_client_that_had_mail_accepted_at_one_gate_skips_the_others_pause(
        daemon_, redis, tmp_path):
    """What a worker remembers of a client whose message it accepted goes to
    Redis too (value 2): another gate greets that client at once."""
    g1, g2 = gates(daemon_, redis.port, tmp_path, SMTPD_GREET_PAUSE=1500)
    c = g1.connect("127.0.0.7")
    assert c.code() == 220
    c.cmd("HELO client.example")
    assert c.cmd("MAIL FROM:<a@example.org>")[0] == 250
    assert c.cmd("RCPT TO:<bob@my.domain>")[0] == 250
    assert c.cmd("DATA")[0] == 354
    c.send(b"Subject: hi\r\n\r\nHello.\r\n.\r\n")
    assert c.reply()[0] == 250
    c.cmd("QUIT")
    key = b"smtpd:pass:" + bytes([127, 0, 0, 7]).hex().encode()
    assert wait_for(lambda: (redis.command("GET", key) or b"").startswith(b"2 "))
    started = time.monotonic()
    assert greet(g2, "127.0.0.7") == 220
    assert time.monotonic() - started < 1.0


@pytest.mark.parametrize("problem", ["missing", "world-readable", "no key", "bad url",
                                     "user twice", "user without password"])
def test_bad_shared_store_configuration_stops_smtpd(daemon_, tmp_path, problem):
    path = secrets(tmp_path, mode=0o644 if problem == "world-readable" else 0o600,
                   key="short" if problem == "no key" else KEY)
    if problem == "missing":
        path = str(tmp_path / "nonexistent")
    url = "redis://localhost:6379/0" if problem == "bad url" else "redis://127.0.0.1:1/0"
    if problem == "user twice":
        with open(path, "a") as f:
            f.write("user someone\n")
        url = "redis://smtpd-gate@127.0.0.1:1/0"
    if problem == "user without password":
        with open(path, "w") as f:
            f.write("key %s\n" % KEY)
        url = "redis://smtpd-gate@127.0.0.1:1/0"
    d = daemon_("allow:ALL:ALL:ALL\n", SMTPD_SHARED_STORE=url, SMTPD_SHARED_STORE_SECRETS=path)
    assert d.proc.wait(20) == 78
    log = d.log()
    assert {"missing": "No such file", "world-readable": "readable by root only",
            "no key": "no 'key SECRET' of at least 16", "bad url": "with an IP address",
            "user twice": "name the ACL user in one place",
            "user without password": "no 'password PW' for the Redis user smtpd-gate"}[
        problem] in log, log


def test_a_wrong_password_is_logged_and_the_gate_serves(daemon_, redis, tmp_path):
    g, = gates(daemon_, redis.port, tmp_path, n=1, SMTPD_MAX_RATE=5,
               SMTPD_SHARED_STORE_SECRETS=secrets(tmp_path, password="wrong"))
    assert greet(g, "127.0.0.9") == 220
    assert re.search(r"AUTH: (WRONGPASS|ERR).*using this gate's own state", g.log()), g.log()


def test_redis_killed_under_load_loses_no_session(daemon_, redis, tmp_path):
    g1, g2 = gates(daemon_, redis.port, tmp_path, SMTPD_MAX_RATE=1000, SMTPD_PREFORK=4)
    results, slow = [], []
    killed = threading.Event()

    def client(n):
        for i in range(40):
            if i == 10:
                killed.wait(30)                 # (the front stage is quick)
            t0 = time.monotonic()
            results.append(greet((g1, g2)[i % 2], "127.0.%d.%d" % (n + 1, i + 1)))
            slow.append(time.monotonic() - t0)
    threads = [threading.Thread(target=client, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    assert wait_for(lambda: len(results) >= 40, timeout=30)
    redis.kill()                                # with 120 sessions to go
    killed.set()
    for t in threads:
        t.join()
    assert results == [220] * 160
    assert max(slow) < 1.0, max(slow)
    assert all("using this gate's own state" in g.log() for g in (g1, g2))


def test_the_metrics_say_whether_the_shared_store_answers(daemon_, redis, tmp_path):
    """smtpd_shared_store_up (issue 39): 1 while Redis answers, 0 once a
    call found it down, 1 again when it is back."""
    import urllib.request
    from harness import free_port
    port = free_port()
    (g,) = gates(daemon_, redis.port, tmp_path, n=1, SMTPD_MAX_RATE=100,
                 SMTPD_METRICS_LISTEN="127.0.0.1:%d" % port)

    def up():
        try:
            with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % port, timeout=5) as r:
                text = r.read().decode()
        except OSError:
            return None
        m = re.search(r"^smtpd_shared_store_up (\d+)$", text, re.M)
        return int(m.group(1)) if m else None
    assert greet(g, "127.0.0.9") == 220
    assert wait_for(lambda: up() == 1)
    redis.kill()
    assert greet(g, "127.0.0.9") == 220
    assert wait_for(lambda: up() == 0)
    redis.start()
    time.sleep(1.2)
    assert greet(g, "127.0.0.9") == 220
    assert wait_for(lambda: up() == 1)
