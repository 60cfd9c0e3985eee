"""A private rspamd for the tests (Debian 12's rspamd 3.4): its own
configuration, database, run and log directories under one temporary
directory, its workers on loopback ports of its own, its DNS pointed at a
loopback port (nothing leaves the host), started in the foreground and
stopped by its pid.  The milter ("proxy") worker scans in-process
(self_scan).  The package (and its user _rspamd) is installed by .ci/run,
never by a test."""

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time

from harness import free_port, is_root

BINARY = "/usr/bin/rspamd"


def available():
    try:
        pwd.getpwnam("_rspamd")
    except KeyError:
        return False
    return is_root and os.path.exists(BINARY)


@contextlib.contextmanager
def instance(dns_port=None):
    """A started rspamd; .milter is its milter port, .log() its log."""
    base = tempfile.mkdtemp(prefix="rspamd-test-", dir="/tmp")
    r = PrivateRspamd(base, dns_port or free_port())
    try:
        r.start()
        yield r
    finally:
        r.stop()
        shutil.rmtree(base, ignore_errors=True)


class PrivateRspamd:
    def __init__(self, base, dns_port):
        self.base = base
        self.milter, self.normal, self.controller = free_port(), free_port(), free_port()
        pw = pwd.getpwnam("_rspamd")
        for d in ("db", "run", "log", "override.d"):
            os.makedirs(os.path.join(base, d))
            if d != "override.d":
                os.chown(os.path.join(base, d), pw.pw_uid, pw.pw_gid)
        os.chmod(base, 0o755)
        conf = {
            "worker-proxy.inc": 'bind_socket = "127.0.0.1:%d"; milter = yes; timeout = 120s;\n'
                                'upstream "local" { default = yes; self_scan = yes; }\n'
                                'count = 1;\n' % self.milter,
            "worker-normal.inc": 'bind_socket = "127.0.0.1:%d"; count = 1;\n' % self.normal,
            "worker-controller.inc": 'bind_socket = "127.0.0.1:%d"; count = 1;\n'
                                     % self.controller,
            "worker-fuzzy.inc": "count = -1;\n",
            "logging.inc": 'type = "file"; filename = "%s/log/rspamd.log"; level = "info";\n'
                           % base,
            "options.inc": 'dns { nameserver = ["127.0.0.1:%d"]; timeout = 0.5s; '
                           'retransmits = 1; }\n' % dns_port,
            # The headers a site adds (rspamd's milter_headers), for loopback too.
            "milter_headers.conf": 'use = ["x-spamd-result", "x-rspamd-server", '
                                   '"x-rspamd-queue-id"]; skip_local = false; '
                                   'skip_authenticated = false;\n',
        }
        for name, text in conf.items():
            with open(os.path.join(base, "override.d", name), "w") as f:
                f.write(text)
        self.proc = None

    def start(self, timeout=90):
        b = self.base
        argv = [BINARY, "-f", "-u", "_rspamd", "-g", "_rspamd", "-c", "/etc/rspamd/rspamd.conf",
                "--var", "LOCAL_CONFDIR=" + b, "--var", "DBDIR=%s/db" % b,
                "--var", "RUNDIR=%s/run" % b, "--var", "LOGDIR=%s/log" % b,
                "-p", "%s/run/rspamd.pid" % b]
        self.out = open(os.path.join(b, "stdout"), "wb")
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self.out,
                                     stderr=self.out, start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError("rspamd exited %s: %s" % (self.proc.returncode, self.log()))
            try:
                socket.create_connection(("127.0.0.1", self.milter), timeout=1).close()
                return
            except OSError:
                time.sleep(0.3)
        raise AssertionError("rspamd did not listen: " + self.log())

    def stop(self):
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)

    def log(self):
        out = ""
        for path in (os.path.join(self.base, "log", "rspamd.log"),
                     os.path.join(self.base, "stdout")):
            try:
                out += open(path, errors="replace").read()[-6000:]
            except OSError:
                pass
        return out
