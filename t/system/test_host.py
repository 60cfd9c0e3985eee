"""The suite does not depend on the host it runs on (issue 22, item 2): a
slice of it runs on a host like one where the gate is installed as the
README says -- a certificate and key in /etc/smtpd, the rsyslog snippet of
`make install`, and the host's own rsyslogd running on /dev/log -- and
passes, and not one line of it reaches the host's mail log.

That host is made in a private mount namespace: /etc, /dev, /run, /var/log
and /var/spool are overlays whose changes land in a temporary directory, so
the real host is never touched."""

import os
import shutil
import subprocess
import tempfile

import pytest

from harness import is_root, ROOT

SLICE = ["t/gate/test_starttls.py", "t/system/test_logging.py", "t/gate/test_pipelining.py",
         "t/gate/test_daemon.py::test_sighup_rereads_rules_and_keeps_them_when_broken",
         "t/forwarder/test_smtpfwdd.py",
         "t/forwarder/test_queuetool.py::test_flush_finds_a_detached_smtpfwdd"]
OVERLAID = ["/etc", "/dev", "/run", "/var/log", "/var/spool"]

SCRIPT = r"""
set -eu
top=$1; shift
# /dev: keep its own mounts (pts, shm) above the overlay
mkdir -p "$top/keep/pts" "$top/keep/shm"
mount --bind /dev/pts "$top/keep/pts"
mount --bind /dev/shm "$top/keep/shm"
for d in %(overlaid)s; do
    n=$(echo "$d" | tr / _)
    mkdir -p "$top/upper$n" "$top/work$n"
    mount -t overlay overlay -o "lowerdir=$d,upperdir=$top/upper$n,workdir=$top/work$n" "$d"
done
mount --move "$top/keep/pts" /dev/pts
mount --move "$top/keep/shm" /dev/shm
# The installed gate: its certificate and key, its rsyslog snippet.
mkdir -p /etc/smtpd /var/spool/smtpd/dev /var/spool/rsyslog
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 1 \
    -subj /CN=host.example -keyout /etc/smtpd/key.pem -out /etc/smtpd/cert.pem 2>/dev/null
sed -e 's|@SPOOLDIR@|/var/spool/smtpd|g' %(root)s/etc/rsyslog-smtpd.conf \
    > /etc/rsyslog.d/smtpd.conf
rm -f /dev/log
rsyslogd -i /run/rsyslogd.pid
i=0; while [ ! -S /dev/log ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
logger -p mail.info "host-test-marker: the host's syslog works"
cd %(root)s
set +e
%(python)s -m pytest -q -p no:cacheprovider "$@"
rc=$?
sleep 1
kill "$(cat /run/rsyslogd.pid)"
exit $rc
"""


def can_overlay():
    if not (is_root and shutil.which("unshare") and shutil.which("rsyslogd")
            and shutil.which("openssl")):
        return False
    p = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c",
                        "d=$(mktemp -d) && mkdir $d/u $d/w && mount -t overlay overlay "
                        "-o lowerdir=/etc,upperdir=$d/u,workdir=$d/w /etc; r=$?; "
                        "rm -rf $d; exit $r"], capture_output=True)
    return p.returncode == 0


@pytest.mark.slow
@pytest.mark.root
@pytest.mark.skipif(not can_overlay(), reason="needs root, unshare, overlayfs, rsyslogd")
def test_a_slice_of_the_suite_on_a_host_with_the_gate_installed():
    top = tempfile.mkdtemp(prefix="smtpd-host-", dir="/tmp")
    try:
        script = SCRIPT % {"overlaid": " ".join(OVERLAID), "root": ROOT,
                           "python": os.path.join(ROOT, ".venv", "bin", "python")}
        p = subprocess.run(["unshare", "-m", "--propagation", "private", "bash", "-c",
                            script, "host-test", top] + SLICE,
                           capture_output=True, text=True, timeout=1200)
        assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-2000:]
        log = os.path.join(top, "upper_var_log", "mail.log")
        lines = open(log, errors="replace").read().splitlines()
        assert any("host-test-marker" in l for l in lines), lines
        ours = [l for l in lines if "smtpd" in l or "smtpfwdd" in l]
        assert ours == [], ours[:10]
    finally:
        subprocess.run(["rm", "-rf", top])
