"""A private Postfix instance for the tests: everything under one directory.

PrivatePostfix(base, ...) writes its own main.cf and master.cf under
base/etc, its queue under base/queue, its data under base/data, its log in
base/maillog and its mailboxes (alias-to-file deliveries) under base/mail,
and is started and stopped with `postfix -c base/etc`.  The system's
/etc/postfix, its running instance (if any), /etc/passwd and /var/mail are
never touched: the instance listens only where a test asks (loopback), its
sendmail is `sendmail -C base/etc`, and local mail goes to files through an
alias map of its own.

A non-root `sendmail` needs a postdrop that may write the maildrop: the
setgid one refuses a configuration directory that the system's main.cf does
not list, so the instance has copies of postdrop and postqueue without the
setgid bit in base/bin (its command_directory) and a world-writable sticky
maildrop, as Postfix ran before postdrop existed.
"""

import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
import time

SERVICES = """\
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


@contextlib.contextmanager
def instance(**kw):
    """A started PrivatePostfix in a new directory under /tmp (its users
    must reach it: not under a 0700 directory), stopped and removed after."""
    base = tempfile.mkdtemp(prefix="postfix-test-", dir="/tmp")
    pf = PrivatePostfix(base, **kw)
    try:
        yield pf.start()
    finally:
        pf.stop()
        shutil.rmtree(base, ignore_errors=True)


def available():
    return (os.geteuid() == 0 and shutil.which("postfix") is not None
            and os.path.exists("/usr/sbin/postdrop"))


class PrivatePostfix:
    """One private instance.  users: local parts that exist (each gets a
    mailbox file under base/mail); listen: {port: "smtpd"} inet services on
    127.0.0.1; main: more main.cf settings."""

    def __init__(self, base, users=(), listen=None, main=None):
        self.base = base
        self.etc = os.path.join(base, "etc")
        self.queue = os.path.join(base, "queue")
        self.maildir = os.path.join(base, "mail")
        self.logpath = os.path.join(base, "maillog")
        self.users = list(users)
        self.listen = dict(listen or {})
        self.main = dict(main or {})
        self.running = False

    # -- setting up --

    def write(self):
        nobody = pwd.getpwnam("nobody")
        for d in (self.etc, self.queue, os.path.join(self.base, "data"),
                  os.path.join(self.base, "bin"), self.maildir):
            os.makedirs(d, exist_ok=True)
        os.chmod(self.base, 0o755)
        os.chown(os.path.join(self.base, "data"), pwd.getpwnam("postfix").pw_uid, -1)
        os.chmod(self.maildir, 0o1777)
        for prog in ("postdrop", "postqueue"):
            dst = os.path.join(self.base, "bin", prog)
            shutil.copy("/usr/sbin/" + prog, dst)
            os.chmod(dst, 0o755)          # no setgid: see the module docstring
        for prog in ("postalias", "postcat", "postconf", "postfix", "postkick", "postlock",
                     "postlog", "postmap", "postsuper"):
            dst = os.path.join(self.base, "bin", prog)
            if not os.path.lexists(dst):
                os.symlink("/usr/sbin/" + prog, dst)
        main = {
            "compatibility_level": "3.6",
            "config_directory": self.etc,
            "queue_directory": self.queue,
            "data_directory": os.path.join(self.base, "data"),
            "command_directory": os.path.join(self.base, "bin"),
            "daemon_directory": "/usr/lib/postfix/sbin",
            "meta_directory": self.etc,
            "shlib_directory": "/usr/lib/postfix",
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "myhostname": "localhost",
            "mydomain": "localdomain",
            "myorigin": "localhost",
            "mydestination": "localhost",
            "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            "alias_maps": "hash:%s/aliases" % self.etc,
            "alias_database": "hash:%s/aliases" % self.etc,
            "local_recipient_maps": "$alias_maps",
            "default_privs": "nobody",
            "maillog_file": self.logpath,
            "maillog_file_prefixes": self.base,
            "syslog_name": "postfix-test",
            "smtputf8_enable": "no",
            "biff": "no",
            "relayhost": "",
            "queue_run_delay": "1s",
            "minimal_backoff_time": "1s",
            "maximal_backoff_time": "2s",
            "delay_warning_time": "0",
            "smtpd_banner": "$myhostname ESMTP private test instance",
            "master_service_disable": "" if self.listen else "inet",
        }
        main.update(self.main)
        with open(os.path.join(self.etc, "main.cf"), "w") as f:
            f.writelines("%s = %s\n" % kv for kv in main.items())
        with open(os.path.join(self.etc, "master.cf"), "w") as f:
            for port, line in self.listen.items():
                f.write("127.0.0.1:%d inet n - n - - %s\n" % (port, line))
            f.write(SERVICES)
        for name in ("postfix-files", "dynamicmaps.cf"):
            shutil.copy(os.path.join("/etc/postfix", name), self.etc)
        if os.path.isdir("/etc/postfix/postfix-files.d"):
            shutil.copytree("/etc/postfix/postfix-files.d",
                            os.path.join(self.etc, "postfix-files.d"), dirs_exist_ok=True)
        if os.path.isdir("/etc/postfix/dynamicmaps.cf.d"):
            shutil.copytree("/etc/postfix/dynamicmaps.cf.d",
                            os.path.join(self.etc, "dynamicmaps.cf.d"), dirs_exist_ok=True)
        with open(os.path.join(self.etc, "aliases"), "w") as f:
            f.write("postmaster: %s\n" % self.mailbox_path("postmaster"))
            f.write("MAILER-DAEMON: %s\n" % self.mailbox_path("postmaster"))
            for u in self.users:
                f.write("%s: %s\n" % (u, self.mailbox_path(u)))
        for u in self.users + ["postmaster"]:
            path = self.mailbox_path(u)
            open(path, "a").close()
            os.chown(path, nobody.pw_uid, nobody.pw_gid)
            os.chmod(path, 0o600)
        self.postfix("postalias", os.path.join(self.etc, "aliases"))

    def postfix(self, prog, *args, check=True):
        return subprocess.run([prog, "-c", self.etc] + list(args), check=check,
                              capture_output=True, text=True, stdin=subprocess.DEVNULL)

    def start(self):
        self.write()
        # The queue's own directories, made as `postfix start` expects them.
        for d, owner, mode in (("maildrop", "postfix", 0o1733), ("public", "postfix", 0o755),
                               ("pid", "root", 0o755)):
            p = os.path.join(self.queue, d)
            os.makedirs(p, exist_ok=True)
            os.chown(p, pwd.getpwnam(owner).pw_uid, -1)
            os.chmod(p, mode)
        r = self.postfix("postfix", "start", check=False)
        if r.returncode != 0:
            raise AssertionError("postfix start: %s %s" % (r.stdout, r.stderr))
        self.running = True
        return self

    def stop(self):
        if self.running:
            self.postfix("postfix", "stop", check=False)
            self.running = False

    # -- using it --

    def sendmail(self):
        """argv[0..] of this instance's sendmail (an agent for smtpfwdd)."""
        return ["/usr/sbin/sendmail", "-C", self.etc]

    def agent(self):
        """An executable smtpfwdd can use as -s: this instance's sendmail."""
        os.makedirs(os.path.join(self.base, "agent"), exist_ok=True)
        path = os.path.join(self.base, "agent", "sendmail")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o755)
        with open(fd, "w") as f:
            f.write('#!/bin/sh\nMAIL_CONFIG=%s exec /usr/sbin/sendmail "$@"\n' % self.etc)
        os.chmod(path, 0o755)
        return path

    def mailbox_path(self, user):
        return os.path.join(self.maildir, user)

    def mailbox(self, user):
        try:
            return open(self.mailbox_path(user), "rb").read()
        except FileNotFoundError:
            return b""

    def log(self):
        try:
            return open(self.logpath, errors="replace").read()
        except FileNotFoundError:
            return ""

    def wait_for_mail(self, user, count=1, timeout=60):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.mailbox(user).count(b"\nFrom ") + self.mailbox(user).startswith(b"From ") \
                    >= count:
                return self.mailbox(user)
            time.sleep(0.3)
        raise AssertionError("no mail for %s in %d s; log:\n%s" % (user, timeout, self.log()))
