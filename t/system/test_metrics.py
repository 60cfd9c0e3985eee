"""Observability (issue 39): the metrics smtpd -D and smtpfwdd serve, the
metrics server under hostile HTTP, the one structured line per message,
session and delivery, smtpq show's record, and a private Prometheus that
scrapes both while mail flows, is refused and fails.

The gate runs as processes over loopback, as everywhere in the suite;
promtool and prometheus are Debian's (.ci/run installs them)."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request

import pytest

from harness import free_port, put, send, spool_files, wait_for

ALLOW = "allow:ALL:ALL:ALL\n"
NOTO_CAROL = "noto:ALL:ALL:carol@my.domain:550 5.7.1 not carol\n" + ALLOW
MESSAGE = b"Subject: hi\r\nMessage-ID: <m1@example.org>\r\n\r\nHello.\r\n.\r\n"


def scrape(port, path="/metrics", timeout=10):
    with urllib.request.urlopen("http://127.0.0.1:%d%s" % (port, path), timeout=timeout) as r:
        return r.status, r.headers.get("Content-Type"), r.read().decode()


def samples(text):
    """{'name{labels}': value} of an exposition text."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def value(text, key):
    return samples(text).get(key, 0.0)


def metrics_gate(daemon_, rules=ALLOW, *flags, **constants):
    port = free_port()
    d = daemon_(rules, *flags, SMTPD_METRICS_LISTEN="127.0.0.1:%d" % port,
                **constants).wait_ready()
    d.metrics_port = port
    assert wait_for(lambda: served(port), 15), d.log()
    return d


def served(port):
    try:
        return scrape(port, timeout=2)[0] == 200
    except OSError:
        return False


def transaction(c, rcpts, helo="EHLO client.example"):
    assert c.cmd(helo)[0] == 250
    assert c.cmd("MAIL FROM:<alice@example.org>")[0] == 250
    codes = [c.cmd("RCPT TO:<%s>" % r)[0] for r in rcpts]
    if 250 not in codes:
        return codes, None
    assert c.cmd("DATA")[0] == 354
    c.send(MESSAGE)
    return codes, c.reply()


def promtool_ok(text):
    """promtool check metrics (lint included): (ok, what it said)."""
    p = subprocess.run(["promtool", "check", "metrics"], input=text.encode(),
                       capture_output=True, timeout=60)
    return p.returncode == 0, (p.stdout + p.stderr).decode()


needs_promtool = pytest.mark.skipif(not shutil.which("promtool"),
                                    reason="needs Debian's prometheus (.ci/run installs it)")


# ------------------------------------------------------------- smtpd ----

@needs_promtool
def test_the_counters_move_with_the_mail(daemon_):
    """A message accepted, a recipient refused by the rules, a pregreet
    talker, a QUIT in the front stage: each moves its counter, the
    histogram counts the message, and promtool finds nothing to lint."""
    d = metrics_gate(daemon_, NOTO_CAROL, SMTPD_GREET_PAUSE=300)
    _, text = scrape(d.metrics_port)[1:]
    assert value(text, 'smtpd_messages_total{result="accepted"}') == 0
    c = d.connect()
    assert c.code() == 220
    codes, reply = transaction(c, ["bob@my.domain", "carol@my.domain"])
    assert codes == [250, 550] and reply[0] == 250
    c.cmd("QUIT")
    bot = d.connect("127.9.0.2")
    bot.send("EHLO early\r\n")
    assert bot.code() == 554
    q = d.connect("127.9.1.2")
    assert q.code() == 220 and q.cmd("QUIT")[0] == 221

    def moved():
        t = scrape(d.metrics_port)[2]
        return (value(t, 'smtpd_messages_total{result="accepted"}') == 1
                and value(t, 'smtpd_connections_total{result="closed",reason="quit"}') == 1
                and value(t, 'smtpd_sessions_total') >= 1)
    assert wait_for(moved, 15), scrape(d.metrics_port)[2]
    status, ctype, text = scrape(d.metrics_port)
    assert status == 200 and ctype.startswith("text/plain; version=0.0.4")
    s = samples(text)
    assert s['smtpd_connections_total{result="accepted"}'] == 1
    assert s['smtpd_connections_total{result="refused",reason="pregreet"}'] == 1
    assert s['smtpd_recipients_total{result="accepted"}'] == 1
    assert s['smtpd_recipients_total{result="refused",reason="rules"}'] == 1
    assert s['smtpd_message_bytes_total'] > 0
    assert s['smtpd_message_seconds_count'] == 1
    assert s['smtpd_message_seconds_bucket{le="+Inf"}'] == 1
    assert 0.3 <= s['smtpd_message_seconds_sum'] < 60      # the 300 ms pause counts
    assert s['smtpd_replies_total{class="5"}'] >= 2
    assert 'smtpd_workers{state="idle"}' in s and 'smtpd_sessions_active' in s
    assert not re.search(r"127\.0\.0\.1|alice|bob@", text)     # no address is a label
    ok, said = promtool_ok(text)
    assert ok, said


def test_filters_lists_and_tls_are_counted_by_name(daemon_, dnsz):
    """The DNS lists' answers by zone, STARTTLS by version, and a filter's
    verdicts by its name: the label values the configuration fixed."""
    import certs
    import ssl
    from fakemilter import FakeMilter, reply
    dnsz.add("2.0.0.127.bl.test", "A", "127.0.0.2")
    pair = certs.make_pair(serial=3901)
    f = FakeMilter({b"R": lambda conn, payload: [reply(b"550 5.7.1 filtered")]
                    if b"dave" in payload else None})
    try:
        d = metrics_gate(daemon_, ALLOW, "-f", f.spec, "-C", pair[0], "-K", pair[1],
                         SMTPD_DNSBL_SITES="bl.test*1 ok.test*1", SMTPD_DNSBL_THRESHOLD=5)
        c = d.connect("127.0.0.2")          # (127.0.0.1's score is cached: wait_ready)
        assert c.code() == 220
        assert c.cmd("EHLO client.example")[0] == 250
        assert c.cmd("STARTTLS")[0] == 220
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        c.sock = ctx.wrap_socket(c.sock)
        codes, reply_ = transaction(c, ["bob@my.domain", "dave@my.domain"])
        assert codes == [250, 550] and reply_[0] == 250
        c.cmd("QUIT")

        def text():
            return scrape(d.metrics_port)[2]
        assert wait_for(lambda: value(text(), 'smtpd_messages_total{result="accepted"}') == 1)
        s = samples(text())
        assert s['smtpd_dnsbl_lookups_total{list="bl.test",result="listed"}'] == 1
        assert s['smtpd_dnsbl_lookups_total{list="ok.test",result="clean"}'] == 1
        assert sum(v for k, v in s.items() if k.startswith("smtpd_tls_sessions_total")
                   and "TLSv1." in k) == 1
        name = 'smtpd_milter_verdicts_total{filter="%s",verdict="%%s"}' % f.spec
        assert s[name % "refuse"] == 1
        assert s[name % "continue"] >= 3
        assert s['smtpd_recipients_total{result="refused",reason="milter"}'] == 1
    finally:
        f.close()


def test_a_worker_that_ends_keeps_its_counts(daemon_):
    """Counters survive their process: a worker killed after its message
    leaves the totals where they were."""
    d = metrics_gate(daemon_, ALLOW)
    assert send(d.port) == {}
    t = lambda: scrape(d.metrics_port)[2]      # noqa: E731
    assert wait_for(lambda: value(t(), 'smtpd_messages_total{result="accepted"}') == 1)
    for pid in d.workers():
        os.kill(pid, signal.SIGKILL)
    time.sleep(1)
    assert send(d.port) == {}
    assert wait_for(lambda: value(t(), 'smtpd_messages_total{result="accepted"}') == 2), t()


def test_the_metrics_server_is_started_again_and_never_root(daemon_):
    d = metrics_gate(daemon_, ALLOW)
    pid = metrics_pid(d)
    assert pid is not None
    uid = int(open("/proc/%d/status" % pid).read().split("Uid:")[1].split()[0])
    if os.geteuid() == 0:
        assert uid != 0
        assert os.readlink("/proc/%d/root" % pid) == os.path.realpath(d.jail)
    assert "Seccomp:\t2" in open("/proc/%d/status" % pid).read() or \
        os.geteuid() != 0
    os.kill(pid, signal.SIGKILL)
    assert wait_for(lambda: metrics_pid(d) not in (None, pid), 15)
    assert wait_for(lambda: served(d.metrics_port), 15)
    assert "metrics server %d ended with signal 9; starting it again" % pid in d.log()


def metrics_pid(d):
    from harness import children, comm
    return next((p for p in children(d.master_pid()) if comm(p) == "smtpd: metrics"), None)


# ------------------------------------------------- hostile HTTP ----

def raw(port, data, wait=5.0, shut=True):
    s = socket.create_connection(("127.0.0.1", port), timeout=wait)
    try:
        if data:
            s.sendall(data)
        if shut:
            s.shutdown(socket.SHUT_WR)
        out = b""
        while True:
            try:
                chunk = s.recv(65536)
            except socket.timeout:
                break
            if not chunk:
                break
            out += chunk
        return out
    finally:
        s.close()


def test_the_metrics_server_survives_garbage_slow_and_huge_requests(daemon_):
    """Garbage gets 400, another method 405, another path 404, a head
    past 8 KB 431; sixteen slow clients that never finish do not keep a
    scrape from its answer, and the server outlives them all."""
    d = metrics_gate(daemon_, ALLOW)
    port = d.metrics_port
    pid = metrics_pid(d)
    assert raw(port, b"\x16\x03\x01\x02\x00garbage\r\n\r\n").startswith(b"HTTP/1.1 400")
    assert raw(port, b"POST /metrics HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 405")
    assert raw(port, b"GET /etc/passwd HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.1 404")
    assert raw(port, b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 20000 + b"\r\n\r\n"
               ).startswith(b"HTTP/1.1 431")
    head = raw(port, b"HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and head.endswith(b"\r\n\r\n")
    assert raw(port, b"GET /metrics?x=1 HTTP/1.0\n\n").startswith(b"HTTP/1.1 200")
    slow = []
    for _ in range(40):
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(b"GET /metr")
        slow.append(s)
    try:
        t0 = time.monotonic()
        assert scrape(port, timeout=10)[0] == 200
        assert time.monotonic() - t0 < 5
    finally:
        for s in slow:
            s.close()
    quiet = socket.create_connection(("127.0.0.1", port))   # says nothing at all
    quiet.settimeout(15)
    t0 = time.monotonic()
    assert quiet.recv(10) == b""                # closed by the server's deadline
    assert time.monotonic() - t0 < 12
    quiet.close()
    assert metrics_pid(d) == pid and served(port)


# ------------------------------------------------ structured lines ----

def test_one_logfmt_line_per_message_and_per_session(daemon_):
    d = metrics_gate(daemon_, NOTO_CAROL, SMTPD_LOG_FORMAT="logfmt")
    c = d.connect()
    assert c.code() == 220
    codes, reply = transaction(c, ["bob@my.domain", "carol@my.domain"])
    assert reply[0] == 250
    c.cmd("QUIT")
    assert wait_for(lambda: "event=session" in d.log())
    (line,) = [l for l in d.log().splitlines() if "event=message" in l]
    f = logfmt(line[line.index("event=message"):])
    (name,) = spool_files(d.jail)
    assert f["id"] == name and f["message_id"] == "<m1@example.org>"
    assert f["client_addr"] == "127.0.0.1" and f["helo"] == "client.example"
    assert f["from"] == "<alice@example.org>" and f["to"] == "<bob@my.domain>"
    assert f["refused"] == "<carol@my.domain>/refused/rules"
    assert f["result"] == "accepted" and int(f["size"]) > 0 and float(f["seconds"]) >= 0
    (sline,) = [l for l in d.log().splitlines() if "event=session" in l]
    s = logfmt(sline[sline.index("event=session"):])
    assert s["messages"] == "1" and s["ids"] == name and s["recipients_refused"] == "1"
    assert "Received " not in d.log()           # the record replaces the classic line


def test_json_lines_are_json(daemon_):
    d = metrics_gate(daemon_, NOTO_CAROL, SMTPD_LOG_FORMAT="json")
    c = d.connect()
    assert c.code() == 220
    transaction(c, ["bob@my.domain", "carol@my.domain"])
    c.cmd("QUIT")
    assert wait_for(lambda: '{"event":"session"' in d.log())
    line = next(l for l in d.log().splitlines() if '{"event":"message"' in l)
    rec = json.loads(line[line.index("{"):])
    assert rec["to"] == ["<bob@my.domain>"]
    assert rec["refused"] == [{"rcpt": "<carol@my.domain>", "result": "refused",
                               "reason": "rules"}]


def test_a_record_too_long_for_a_log_line_stays_json(daemon_):
    """Sixty long recipients make a record past a syslog line: the lists
    lose their ends, truncated says so, and the line is still JSON."""
    d = metrics_gate(daemon_, ALLOW, SMTPD_LOG_FORMAT="json")
    c = d.connect()
    assert c.code() == 220
    rcpts = ["%s%02d@my.domain" % ("r" * 50, i) for i in range(60)]
    codes, reply = transaction(c, rcpts)
    assert set(codes) == {250} and reply[0] == 250
    c.cmd("QUIT")
    assert wait_for(lambda: '{"event":"message"' in d.log())
    line = next(l for l in d.log().splitlines() if '{"event":"message"' in l)
    rec = json.loads(line[line.index("{"):])
    assert rec["truncated"] is True and rec["rcpts"] == 60
    assert 0 < len(rec["to"]) < 60 and rec["to"][0] == "<%s>" % rcpts[0]


def test_a_bad_log_format_or_listen_address_stops_smtpd_with_78(tree_factory):
    from harness import TEST_CONSTANTS, make_jail, smtpd_argv, PYTHON  # noqa: F401
    for constants, said in ((dict(SMTPD_LOG_FORMAT="xml"), "SMTPD_LOG_FORMAT = xml"),
                            (dict(SMTPD_METRICS_LISTEN="localhost:9"),
                             "SMTPD_METRICS_LISTEN = localhost:9")):
        tree = tree_factory(**dict(TEST_CONSTANTS, **constants))
        jail = make_jail(ALLOW)
        p = subprocess.run(smtpd_argv(tree, jail, "-t"), capture_output=True, timeout=60)
        shutil.rmtree(jail, ignore_errors=True)
        assert p.returncode == 78 and said in p.stderr.decode(), p.stderr


def logfmt(text):
    out = {}
    for m in re.finditer(r'(\w+)=("(?:[^"\\]|\\.)*"|\S*)', text):
        v = m.group(2)
        out[m.group(1)] = v[1:-1].replace('\\"', '"').replace("\\\\", "\\") \
            if v.startswith('"') else v
    return out


# ---------------------------------------------------------- smtpfwdd ----

def fwd_metrics(fwd_env, **constants):
    port = free_port()
    f = fwd_env.start(SMTPFWDD_METRICS_LISTEN="127.0.0.1:%d" % port, **constants)
    f.metrics_port = port
    assert wait_for(lambda: served(port), 20), f.log()
    return f


@needs_promtool
def test_smtpfwdd_counts_deliveries_bounces_and_its_queue(fwd_env):
    """Two delivered, one failed (a notification to its sender), one held
    in hold/, one deferred: each state and outcome is counted."""
    f = fwd_metrics(fwd_env, SMTPD_LOG_FORMAT="logfmt")
    agent = fwd_env.agent
    agent.statuses(0, 0, 67, 75, 0)
    for _ in range(2):
        put(fwd_env.spool)
    assert wait_for(lambda: len(agent.calls()) == 2)
    put(fwd_env.spool, rcpts=(b"<nobody@my.domain>",))
    assert wait_for(lambda: len(agent.calls()) >= 3)
    os.makedirs(os.path.join(fwd_env.spool, "hold"), exist_ok=True)
    with open(os.path.join(fwd_env.spool, "hold", "smtpdHELD01"), "wb") as h:
        h.write(b"x")
    put(fwd_env.spool, rcpts=(b"<later@my.domain>",))

    def moved():
        s = samples(scrape(f.metrics_port)[2])
        return (s.get('smtpfwdd_deliveries_total{result="sent"}', 0) >= 3
                and s.get('smtpfwdd_deliveries_total{result="failed"}') == 1
                and s.get('smtpfwdd_deliveries_total{result="deferred"}', 0) >= 1
                and s.get('smtpfwdd_queue_messages{state="held"}') == 1)
    assert wait_for(moved, 30), scrape(f.metrics_port)[2]
    text = scrape(f.metrics_port)[2]
    s = samples(text)
    assert s['smtpfwdd_bounces_total{action="failed"}'] == 1
    assert s['smtpfwdd_queue_messages{state="failed"}'] == 1
    ok, said = promtool_ok(text)
    assert ok, said
    line = next(l for l in f.log().splitlines() if "event=delivery" in l and "result=failed" in l)
    rec = logfmt(line[line.index("event=delivery"):])
    assert rec["agent_status"] == "67" and rec["to"] == "<nobody@my.domain>"
    assert float(rec["delay"]) >= 0 and rec["id"].startswith("smtpd")
