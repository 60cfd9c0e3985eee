"""Test certificates, made with the openssl command (installed by .ci/run)."""

import os
import subprocess
import tempfile


def make_pair(directory=None, cn="mx.my.domain", serial=1, key="rsa:2048"):
    """A self-signed certificate and its key in a new directory (0755) under
    /tmp; returns (cert path, key path).  The key file is 0600."""
    d = directory or tempfile.mkdtemp(prefix="certs-", dir="/tmp")
    os.chmod(d, 0o755)
    cert, keyfile = os.path.join(d, "cert.pem"), os.path.join(d, "key.pem")
    if key.startswith("ec"):
        newkey = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"]
    else:
        newkey = ["-newkey", key]
    subprocess.run(["openssl", "req", "-x509", "-nodes", "-days", "30", "-subj", "/CN=" + cn,
                    "-set_serial", str(serial), "-keyout", keyfile, "-out", cert] + newkey,
                   check=True, capture_output=True)
    os.chmod(keyfile, 0o600)
    return cert, keyfile


def serial_of(der):
    """The serial number of a DER certificate (as ssl gives it)."""
    p = subprocess.run(["openssl", "x509", "-inform", "DER", "-noout", "-serial"],
                       input=der, capture_output=True, check=True)
    return int(p.stdout.decode().strip().split("=", 1)[1], 16)
