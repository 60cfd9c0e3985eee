"""Smaller holes an attacker can use (issue 21, item 4): a rate table whose
placement can be predicted, a verification cache that folds the local
part's case, and DNS list error codes taken for listings."""

import socket
import threading
import zlib

from smtpgate.gate import admission
from harness import free_port, wait_for


# -- the rate table: chosen networks cannot evict an abuser --

def colliding(victim, count, sets):
    """count 127.x addresses whose networks share the victim's set under
    the unkeyed hash the table once used (crc32)."""
    want = zlib.crc32(admission.network_key(admission.ipaddress.ip_address(victim))) % sets
    out = []
    for n in range(2 << 16):
        addr = "127.%d.%d.%d" % (1 + n // 65536, n // 256 % 256, n % 256)
        key = admission.network_key(admission.ipaddress.ip_address(addr))
        if zlib.crc32(key) % sets == want:
            out.append(addr)
            if len(out) == count:
                return out
    raise AssertionError("no collisions found")


def code_from(d, source):
    c = d.connect(source)
    code = c.code()
    c.close()
    return code


def test_chosen_networks_cannot_evict_an_abuser(daemon_):
    d = daemon_(SMTPD_MAX_RATE=2, SMTPD_RATE_WINDOW=300).wait_ready()
    abuser = "127.0.0.2"
    assert [code_from(d, abuser) for _ in range(3)] == [220, 220, 421]
    for addr in colliding(abuser, 8, 4096 // admission.RateTable.WAYS):
        assert code_from(d, addr) == 220
    assert code_from(d, abuser) == 421          # still remembered, still refused


# -- verification: a local part is case-sensitive --

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


# -- DNS lists: an error code is never a listing --

def test_an_rbl_error_answer_gets_451_not_the_deny(smtpd, dnsz):
    dnsz.add("1.0.0.127.rbl.example", "A", "127.255.255.254")
    srv = smtpd("deny:RBL.rbl.example:ALL:ALL:554 listed\nallow:ALL:ALL:ALL\n", "-H")
    c = srv.connect()
    assert c.code() == 220
    assert c.cmd("EHLO client.example")[0] == 250
    assert c.cmd("MAIL FROM:<a@example.org>")[0] == 250
    code, text = c.cmd("RCPT TO:<b@my.domain>")
    assert code == 451 and "listed" not in text[0]
    assert c.cmd("QUIT")[0] == 221
    assert wait_for(lambda: "127.255.255.254 is an error code of the list" in srv.log())


# -- what root prints or reads of the jail's rules file --

def checkrules(tree, *args):
    import subprocess
    from harness import PYTHON
    import os
    p = subprocess.run([PYTHON, os.path.join(tree, "checkrules.py")] + list(args),
                       capture_output=True, text=True, timeout=60,
                       env={"PATH": "/usr/bin:/bin", "SMTPD_NAMESERVER": "127.0.0.1@9"})
    return p.returncode, p.stdout, p.stderr


def test_rule_errors_reach_the_terminal_with_controls_visible(tree_factory, tmp_path):
    path = tmp_path / "rules"
    path.write_bytes(b"noto:/(\x1b]0;pwned\x07/:ALL:ALL\n"
                     b"noto:ALL:ALL:ALL:550 ok\x1b[2J\n")
    status, out, _ = checkrules(tree_factory(), "-t", "-f", str(path))
    assert status == 78
    assert "\x1b" not in out and "\x07" not in out
    assert "\\x1b]0;pwned\\x07" in out
    assert "control character in reply" in out      # a reply may carry none


def test_a_reply_template_with_a_line_break_is_refused():
    from smtpgate.rules import ruleset as cr
    import pytest
    with pytest.raises(cr.RuleError):
        cr.parse("noto:ALL:ALL:ALL:550 x\r250 forged\n")


def test_as_root_checkrules_reads_the_jails_rules_as_the_jails_owner(tree_factory, tmp_path):
    import os
    import pytest
    from harness import is_root, make_jail
    if not is_root:
        pytest.skip("needs root")
    jail = make_jail()
    secret = tmp_path / "secret"                    # root's alone
    secret.write_text("root:$6$hash:19000:0:99999:7:::\n")
    os.chmod(str(secret), 0o600)
    rules = os.path.join(jail, "etc", "smtpd_check_rules")
    os.unlink(rules)
    os.symlink(str(secret), rules)                  # what a compromised worker can do
    tree = tree_factory(SPOOLDIR=jail)
    status, out, err = checkrules(tree, "-t")
    assert status == 78 and "Permission denied" in out
    assert "root" not in out.replace(jail, "").replace(tree, "")
    status, out, _ = checkrules(tree, "-t", "-f", str(secret))   # a root file elsewhere
    assert status == 78 and "unknown action 'root'" in out
