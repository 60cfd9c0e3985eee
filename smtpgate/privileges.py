"""privileges - users, groups, and the one way a process gives up root

DESCRIPTION
    resolve_identity() turns -u/-g into (pw, gr), refusing root;
    prepare_jail() does what a chrooted process could not do later;
    confine() chroots (unless None) and drops privileges in a fixed order:
    chroot, chdir, supplementary groups cleared, gid, uid -- then verifies
    that root cannot be regained.  become_owner() is the same drop, without
    a chroot, for a root tool about to read a directory someone else owns
    (smtpq on the spool, checkrules on the jail's rules).
"""

import encodings.idna  # noqa: F401  (socket and dnspython need it in the jail)
import grp
import os
import pwd
import socket
import time

from smtpgate.log import die


def lookup_user(spec):
    """Resolve a user name or decimal uid; None when unknown."""
    try:
        return pwd.getpwuid(int(spec)) if spec.isdigit() else pwd.getpwnam(spec)
    except (KeyError, ValueError):
        return None


def lookup_group(spec):
    """Resolve a group name or decimal gid; None when unknown."""
    try:
        return grp.getgrgid(int(spec)) if spec.isdigit() else grp.getgrnam(spec)
    except (KeyError, ValueError):
        return None


def resolve_identity(user, group):
    """Return (pw, gr) for -u/-g or die: unknown -> 64, root -> 78."""
    pw = lookup_user(user)
    if pw is None:
        die(os.EX_USAGE, "unknown user %r", user)
    gr = lookup_group(group)
    if gr is None:
        die(os.EX_USAGE, "unknown group %r", group)
    if pw.pw_uid == 0:
        die(os.EX_CONFIG, "refusing to run as uid 0 (user %s)", pw.pw_name)
    if gr.gr_gid == 0:
        die(os.EX_CONFIG, "refusing to run as gid 0 (group %s)", gr.gr_name)
    return pw, gr


def own_name():
    """This host's name, canonical if the resolver knows it."""
    name = socket.gethostname()
    if "." not in name:
        try:
            name = socket.getaddrinfo(name, None, flags=socket.AI_CANONNAME)[0][3] or name
        except OSError:
            pass
    return name


def prepare_jail():
    """Do now what a chrooted process could not do later."""
    time.tzset()
    socket.gethostname()


def become(uid, gid):
    """setgroups, setresgid, setresuid: for good.  OSError if refused."""
    os.setgroups([gid])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)


def confine(pw, gr, jail):
    """Chroot to jail (unless None) and become pw/gr for good."""
    if jail is not None:
        try:
            os.chroot(jail)
            os.chdir("/")
        except OSError as e:
            die(os.EX_CONFIG, "chroot(%s): %s", jail, e.strerror)
    try:
        become(pw.pw_uid, gr.gr_gid)
    except OSError as e:
        die(os.EX_OSERR, "dropping privileges to %s/%s: %s",
            pw.pw_name, gr.gr_name, e.strerror)
    try:
        os.setuid(0)
    except PermissionError:
        return
    die(os.EX_SOFTWARE, "setuid(0) succeeded after dropping privileges")


def become_owner(path):
    """As root: become the owner of the directory path (its uid and group,
    no other group).  One owned by root is not someone else's: then
    nothing changes, and nothing does unless we are root.  OSError."""
    st = os.stat(path)
    if os.geteuid() == 0 and st.st_uid != 0:
        become(st.st_uid, st.st_gid)
