"""Run smtpd as inetd would, and talk to it: the tests' SMTP client side."""

import ast
import email.utils
import fcntl
import glob
import grp
import json
import os
import pwd
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import termios
import threading
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Our smtpd.py shadows the deprecated stdlib module of the same name.
sys.path.insert(0, ROOT)
from smtpgate import spool  # noqa: E402  (from ROOT)
PYTHON = sys.executable
def package_modules():
    """The Makefile's PACKAGE_MODULES: what `make install` installs."""
    text = open(os.path.join(ROOT, "Makefile")).read().replace("\\\n", " ")
    line = next(l for l in text.split("\n") if l.startswith("PACKAGE_MODULES ="))
    return line.split("=", 1)[1].split()


# What `make install` installs: the three programs and the package's
# modules, and the Makefile to build buildconf.py with.
PROGRAMS = ["smtpd.py", "smtpfwdd.py", "checkrules.py"]
PACKAGE = "smtpgate"
MODULES = package_modules()

is_root = os.geteuid() == 0
def needs_root(test):
    """A test that needs root (chroot, setuid, port 25): marked root, so
    that `pytest -m root` runs them all; skipped when not root (CI is)."""
    return pytest.mark.root(pytest.mark.skipif(not is_root, reason="needs root")(test))
IDENT_PORT = 11313      # the test trees are built with this IDENT_PORT

# (No error delays: sessions that collect errors on purpose stay fast; the
# tarpit has tests of its own.)
TEST_CONSTANTS = dict(IDENT_PORT=IDENT_PORT, DNS_TIMEOUT=2, NOTO_DELAY=1,
                      DENY_DELAY=1, SMTPD_ERROR_SLEEP=0)


# What a tree of the tests never takes from the host it runs on: the
# certificate, key and settings an installed gate has in /etc/smtpd, the host's syslog
# socket (its rsyslogd would get our lines), its pid directory, spool and
# mail agent.  A test that wants one of these names its own.
NOWHERE = "/nonexistent-smtpd-test"
HOST_NEUTRAL = dict(TLS_CERT="", TLS_KEY="", LOG_SOCKET=NOWHERE + "/log", PID_DIR=NOWHERE,
                    SPOOLDIR=NOWHERE + "/spool", MAIL_AGENT=NOWHERE + "/sendmail",
                    SETTINGS_FILE=NOWHERE + "/smtpd.conf")


def build_tree(dest, **constants):
    """Copy the programs to dest and `make` them with other constants (and
    HOST_NEUTRAL's, unless the test names its own)."""
    constants = dict(HOST_NEUTRAL, **constants)
    os.makedirs(dest, exist_ok=True)
    for name in PROGRAMS + ["Makefile"]:
        shutil.copy(os.path.join(ROOT, name), dest)
    for m in MODULES:
        os.makedirs(os.path.dirname(os.path.join(dest, PACKAGE, m)), exist_ok=True)
        shutil.copy(os.path.join(ROOT, PACKAGE, m + ".py"), os.path.join(dest, PACKAGE, m + ".py"))
    args = ["%s=%s" % kv for kv in constants.items()]
    subprocess.run(["make", "-s", "-C", dest, "buildconf.py"] + args,
                   check=True, stdout=subprocess.DEVNULL)
    return dest


def site_packages():
    """A copy of the packages the programs need that nobody can read: the
    venv may sit in a directory only root can enter (a clone under mktemp -d)."""
    import dns
    src = os.path.dirname(os.path.dirname(dns.__file__))
    dst = tempfile.mkdtemp(prefix="smtpd-site-", dir="/tmp")
    os.chmod(dst, 0o755)
    for pkg in ("dns", "daemon", "lockfile", "idna"):
        shutil.copytree(os.path.join(src, pkg), os.path.join(dst, pkg),
                        ignore=shutil.ignore_patterns("__pycache__"))
    for d, _, files in os.walk(dst):
        os.chmod(d, 0o755)
        for f in files:
            os.chmod(os.path.join(d, f), 0o644)
    return dst


def nobody_tree(**constants):
    """(tree, env, argv prefix) to run the programs as user nobody with the
    system's Python: a built tree and the packages, both readable by all."""
    tree = tempfile.mkdtemp(prefix="smtpd-tree-", dir="/tmp")
    os.chmod(tree, 0o755)
    build_tree(tree, **constants)
    env = dict(os.environ, PYTHONPATH=site_packages())
    return tree, env, ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
                       "/usr/bin/python3"]


NOBODY = "nobody"
NOGROUP = grp.getgrgid(pwd.getpwnam("nobody").pw_gid).gr_name


def make_jail(rules="allow:ALL:ALL:ALL\n"):
    """A jail like SPOOLDIR: spool at its root, etc/smtpd_check_rules."""
    d = tempfile.mkdtemp(prefix="smtpd-jail-", dir="/tmp")
    os.mkdir(os.path.join(d, "etc"))
    write_rules(d, rules)
    if is_root:
        pw = pwd.getpwnam(NOBODY)
        os.chown(d, pw.pw_uid, pw.pw_gid)
    os.chmod(d, 0o700)
    return d


def write_rules(jail, text):
    path = os.path.join(jail, "etc", "smtpd_check_rules")
    tmp = path + ".new"
    with open(tmp, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o644)
    os.rename(tmp, path)


def wait_for(pred, timeout=15):
    """Poll pred until it is true or timeout seconds have passed."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return pred()


def spool_files(d):
    return sorted(n for n in os.listdir(d) if n.startswith("smtpd"))


class Daemon:
    """A daemon started by a test: .proc, its log file .logpath."""

    def log(self):
        return open(self.logpath, errors="replace").read()

    def stop(self, timeout=40):
        """SIGTERM (if still running); the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            self.log_file.close()


class Inetd:
    """Accept on addr:port and run argv for each connection on fds 0/1."""

    def __init__(self, argv, env=None, addr="127.0.0.1", logdir=None):
        self.argv, self.env = argv, env
        self.listener = socket.create_server((addr, 0))
        self.addr, self.port = self.listener.getsockname()
        self.procs = []
        self.logdir = logdir or tempfile.mkdtemp(prefix="smtpd-log-")
        self.thread = threading.Thread(target=self.loop, daemon=True)
        self.thread.start()

    def loop(self):
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            log = open(os.path.join(self.logdir, "%d.log" % len(self.procs)), "wb")
            p = subprocess.Popen(self.argv, stdin=conn.fileno(), stdout=conn.fileno(),
                                 stderr=log, env=self.env, close_fds=True)
            conn.close()
            log.close()
            self.procs.append(p)

    def connect(self, source="127.0.0.1"):
        s = socket.create_connection((self.addr, self.port), timeout=30,
                                     source_address=(source, 0))
        return Client(s)

    def last_status(self, timeout=30):
        """Exit status of the most recent session."""
        deadline = time.time() + timeout
        while not self.procs and time.time() < deadline:
            time.sleep(0.01)
        return self.procs[-1].wait(timeout)

    def log(self):
        """Everything the sessions wrote to stderr (their log lines)."""
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                pass
        out = []
        for n in sorted(os.listdir(self.logdir)):
            out.append(open(os.path.join(self.logdir, n), errors="replace").read())
        return "".join(out)

    def close(self):
        self.listener.close()
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        shutil.rmtree(self.logdir, ignore_errors=True)


class Client:
    """A raw SMTP client: send bytes, read replies."""

    def __init__(self, sock):
        self.sock = sock
        self.buf = b""

    def send(self, data):
        if isinstance(data, str):
            data = data.encode("latin-1")
        self.sock.sendall(data)

    def line(self):
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("connection closed; pending %r" % self.buf)
            self.buf += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line.decode("latin-1")

    def reply(self):
        """One (possibly multi-line) reply -> (code, [texts])."""
        texts = []
        while True:
            line = self.line()
            texts.append(line[4:])
            if line[3:4] != "-":
                return int(line[:3]), texts

    def code(self):
        return self.reply()[0]

    def cmd(self, line):
        self.send(line + "\r\n")
        return self.reply()

    def closed(self, timeout=10):
        """True if the server closed the connection (after any buffered data)."""
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(1) == b""
        except (ConnectionResetError, socket.timeout):
            return False

    def close(self):
        self.sock.close()


def smtpd_argv(tree, jail, *extra):
    argv = [PYTHON, os.path.join(tree, "smtpd.py"), "-c", jail, "-m", "mx.my.domain"]
    if is_root:
        argv += ["-u", NOBODY, "-g", NOGROUP]
    return argv + list(extra)


class Agent:
    """A copy of t/lib/bin/fake-sendmail that every user can run."""

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="fake-sendmail-", dir="/tmp")
        os.chmod(self.dir, 0o755)
        self.path = os.path.join(self.dir, "sendmail")
        shutil.copy(os.path.join(ROOT, "t", "lib", "bin", "fake-sendmail"), self.path)
        os.chmod(self.path, 0o755)
        os.mkdir(os.path.join(self.dir, "calls"))
        os.chmod(os.path.join(self.dir, "calls"), 0o777)

    def statuses(self, *values):
        with open(os.path.join(self.dir, "statuses"), "w") as f:
            f.write("\n".join(str(v) for v in values) + "\n")
        os.chmod(os.path.join(self.dir, "statuses"), 0o644)

    def calls(self):
        return [json.load(open(p)) for p in sorted(glob.glob(self.dir + "/calls/*.json"))]

    def reset(self):
        for p in glob.glob(self.dir + "/calls/*"):
            os.unlink(p)


def free_port(addr="127.0.0.1"):
    with socket.socket() as s:
        s.bind((addr, 0))
        return s.getsockname()[1]


def send(port, rcpt="bob@my.domain", source="127.0.0.1"):
    with smtplib.SMTP("127.0.0.1", port, timeout=30,
                      source_address=(source, 0)) as s:
        return s.sendmail("alice@example.org", [rcpt], b"Subject: x\r\n\r\nhello\r\n")


class SmtpdDaemon(Daemon):
    """smtpd -D -F (or detached) on 127.0.0.1:port with a jail of its own;
    wrap: a command to run it under (e.g. ip netns exec NS)."""

    def __init__(self, tree, jail, *flags, port=None, pidfile=None, env=None, detach=False,
                 listen="127.0.0.1", wrap=(), tty=None):
        self.jail = jail
        self.port = port or free_port()
        self.pidfile = pidfile or jail + ".pid"
        self.logpath = jail + ".log"
        argv = list(wrap) + [PYTHON, os.path.join(tree, "smtpd.py"), "-D", "-H", "-c", jail,
                             "-m", "mx.my.domain", "-l", listen, "-p", str(self.port),
                             "-i", self.pidfile] + ([] if detach else ["-F"]) + list(flags)
        if is_root:
            argv += ["-u", NOBODY, "-g", "nogroup"]
        self.log_file = open(self.logpath, "wb")
        if tty is not None:         # an operator's terminal: standard I/O and controlling tty
            self.proc = subprocess.Popen(argv, stdin=tty, stdout=tty, stderr=tty, env=env,
                                         preexec_fn=own_terminal)
            return
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self.log_file,
                                     stderr=self.log_file, env=env)

    def wait_ready(self, timeout=20):
        """Listening, and its pid file names the live master (it binds the
        port an instant before it replaces a stale pid file)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                if comm(self.master_pid()) == "smtpd: master":
                    return self
            except (OSError, ValueError, IndexError):
                # (Detached, the foreground process exits 0 before the pid file is there.)
                if self.proc.poll() not in (None, 0) and not os.path.exists(self.pidfile):
                    raise AssertionError("smtpd exited %s: %s" % (self.proc.returncode, self.log()))
            time.sleep(0.05)
        raise AssertionError("smtpd -D not ready: " + self.log())

    def connect(self, source="127.0.0.1"):
        s = socket.create_connection(("127.0.0.1", self.port), timeout=30,
                                     source_address=(source, 0))
        return Client(s)

    def master_pid(self):
        return int(open(self.pidfile).read().split()[0])

    def workers(self):
        return [p for p in children(self.master_pid()) if comm(p) == "smtpd: worker"]

    def screen(self):
        """The front stage: the pid of the one running (None while there is none)."""
        found = [p for p in children(self.master_pid()) if comm(p) == "smtpd: screen"]
        return found[0] if len(found) == 1 else None

    def watcher(self):
        """The jailed process that reads the rules for the master."""
        return [p for p in children(self.master_pid()) if comm(p) == "smtpd: rules"]


def own_terminal():
    """In a child about to run a program: standard input, a terminal,
    becomes its controlling terminal, as a login shell's child has it."""
    os.setsid()
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


class Terminal:
    """A pseudo-terminal, as an operator's shell has: .slave for the program,
    text() what it has shown so far (a thread reads it as it comes)."""

    def __init__(self):
        self.master, self.slave = os.openpty()
        self.out = bytearray()
        threading.Thread(target=self.read, daemon=True).start()

    def read(self):
        while True:
            try:
                data = os.read(self.master, 65536)
            except OSError:
                return
            if not data:
                return
            self.out += data

    def text(self):
        return bytes(self.out)

    def close(self):
        for fd in (self.slave, self.master):
            try:
                os.close(fd)
            except OSError:
                pass


def tty_and_session(pid):
    """(tty_nr, session id) of pid: tty_nr 0 is no controlling terminal."""
    fields = open("/proc/%d/stat" % pid).read().rsplit(")", 1)[1].split()
    return int(fields[4]), int(fields[3])


def terminal_fds(pid):
    """The descriptors of pid that are terminals: [(fd, path)]."""
    out = []
    for fd in os.listdir("/proc/%d/fd" % pid):
        try:
            path = os.readlink("/proc/%d/fd/%s" % (pid, fd))
        except OSError:
            continue
        if path.startswith(("/dev/pts/", "/dev/tty", "/dev/console", "/dev/ptmx")):
            out.append((int(fd), path))
    return out


def comm(pid):
    try:
        return open("/proc/%d/comm" % pid).read().strip()
    except OSError:
        return None



def children(ppid):
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = open("/proc/%s/stat" % d).read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == ppid:
                out.append(int(d))
    return out


def pid_as_soon_as_written(pidfile, timeout=20):
    """The pid in pidfile the moment it can be read."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            return int(open(pidfile).read().split()[0])
        except (OSError, ValueError, IndexError):
            time.sleep(0.0002)
    raise AssertionError("no pid in %s" % pidfile)


def gone(pid):
    """pid has exited (or is a zombie nobody reaped yet)."""
    try:
        return open("/proc/%d/stat" % pid).read().split()[2] == "Z"
    except OSError:
        return True


def status_field(pid, name):
    for line in open("/proc/%d/status" % pid):
        if line.startswith(name + ":"):
            return line.split(":", 1)[1].split()
    return None


def never_ignores_sigterm(pid, seconds=1.0):
    """Watch pid for seconds: its SIGTERM is never set to SIG_IGN."""
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        ignored = int(status_field(pid, "SigIgn")[0], 16)
        assert not ignored & 1 << (signal.SIGTERM - 1), "SIGTERM ignored"


# ------------------------------------------------------------ smtpfwdd ----

FWD_CONSTANTS = dict(RETRY_DELAY_TIME=1, SESSION_TIMEOUT=2, SHUTDOWN_TIMEOUT=20)
RECEIVED = (b"Received: from mailhost (mail.example.org [192.0.2.10])\n"
            b"\tby mx.my.domain (smtpd) with SMTP id smtpdXXXXXX;\n"
            b"\t%s\n")
BODY = b"Subject: test\n\nHello.\n"


def now_date():
    return email.utils.formatdate(localtime=True).encode()


class Fwd(Daemon):
    """smtpfwdd -F -P 1 on spooldir with agent."""

    def __init__(self, tree, spooldir, agent, *flags, env=None):
        self.logpath = spooldir + ".log"
        self.log_file = open(self.logpath, "ab")
        argv = [PYTHON, os.path.join(tree, "smtpfwdd.py"), "-F", "-d", spooldir,
                "-s", agent, "-P", "1"] + list(flags)
        if is_root:
            argv += ["-u", "nobody", "-g", "nogroup"]
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self.log_file,
                                     stderr=self.log_file,
                                     env=dict(os.environ, **(env or {})))



def put(spooldir, sender=b"<alice@example.org>", rcpts=(b"<bob@my.domain>",),
        body=None, dsn=None):
    body = body if body is not None else RECEIVED % now_date() + BODY
    with spool.Draft(spooldir, sender, list(rcpts), dsn=dsn) as d:
        d.write(body)
        name = d.commit()
    give_to_nobody(os.path.join(spooldir, name))
    return name


def give_to_nobody(path):
    if is_root:
        pw = pwd.getpwnam("nobody")
        os.chown(path, pw.pw_uid, pw.pw_gid)


# ------------------------------------------------ inside a live process ----

def run_inside(pid, root, code, timeout=60):
    """Run Python code inside the live process pid, as an attacker who took
    it over would (gdb attaches, as root, and calls PyRun_SimpleString with
    the GIL held).  root: the directory the process sees as / (its jail).
    The code leaves its findings in the dict `found`; returns it."""
    probe = os.path.join(root, "probe.py")
    out = os.path.join(root, "probe.out")
    inside = "/" if os.readlink("/proc/%d/root" % pid) == os.path.realpath(root) else root + "/"
    with open(probe, "w") as f:
        f.write("import os\nfound = {}\ntry:\n")
        f.write("".join("    " + line + "\n" for line in code.strip().splitlines()))
        f.write("except BaseException as e:\n    found['error'] = repr(e)\n")
        f.write("with open(%r, 'w') as f:\n    f.write(repr(found))\n" % (inside + "probe.out"))
    os.chmod(probe, 0o644)
    run = "exec(open('%sprobe.py').read(), {})" % inside
    subprocess.run(["gdb", "-p", str(pid), "-batch", "-nx",
                    "-ex", "call (int)PyGILState_Ensure()",
                    "-ex", 'call (int)PyRun_SimpleString("%s")' % run,
                    "-ex", "call (void)PyGILState_Release($1)"],
                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, timeout=timeout, check=True)
    try:
        with open(out) as f:
            return ast.literal_eval(f.read())
    finally:
        for p in (probe, out):
            if os.path.exists(p):
                os.unlink(p)


def needs_gdb(test):
    """A test that acts inside a live jailed process: root and gdb."""
    return pytest.mark.root(pytest.mark.skipif(
        not (is_root and shutil.which("gdb")),
        reason="needs root and gdb (to act inside a live process)")(test))
