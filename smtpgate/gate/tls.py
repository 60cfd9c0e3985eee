"""tlscert - smtpd's certificate and key, loaded as root before the jail

DESCRIPTION
    load(cert, key) reads a PEM certificate chain and its private key into
    a server ssl.SSLContext: TLS 1.2 at least (RFC 8996), no compression,
    no renegotiation, the library's default ciphers, session tickets
    allowed.  Both files live outside the jail and are read by root before
    the chroot; a jailed worker holds only the context, never a path to the
    key.  Certificates tracks the files for the -D master: it reloads on
    SIGHUP and when either file changes, and keeps the old context when the
    new pair does not load.
"""

import os
import ssl

from smtpgate import log, process


class CertError(Exception):
    """The pair cannot be loaded; str() says which file and why."""


def load(cert, key):
    """A server SSLContext for cert and key; CertError if they fail."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    for path in (cert, key):        # name the file that is missing, not "cert"
        try:
            os.stat(path)
        except OSError as e:
            raise CertError("%s: %s" % (path, e.strerror)) from None
    try:
        ctx.load_cert_chain(cert, key)
    except FileNotFoundError as e:
        raise CertError("%s: %s" % (e.filename or cert, e.strerror)) from None
    except OSError as e:
        raise CertError("%s or %s: %s" % (cert, key, e.strerror)) from None
    except ssl.SSLError as e:
        raise CertError("%s with %s: %s" % (cert, key, e.reason or e)) from None
    return ctx


def stamps(*paths):
    return tuple(process.stamp(p) for p in paths)


class Certificates:
    """The pair smtpd offers: .context (None: no STARTTLS)."""

    def __init__(self, cert, key, explicit):
        self.cert, self.key, self.explicit = cert, key, explicit
        self.context = None
        self.stamp = None

    def start(self, quiet=False):
        """Load at start.  No paths, or default paths of which neither
        exists: plaintext only, one notice (a debug line when quiet: inetd
        mode starts once per connection).  Anything else that fails, half a
        pair included: CertError, naming the file."""
        if not self.cert or not self.key:
            return self
        self.stamp = stamps(self.cert, self.key)
        if not self.explicit and not (os.path.exists(self.cert) or os.path.exists(self.key)):
            (log.debug if quiet else log.notice)(
                "no certificate and key at %s and %s: STARTTLS is not offered",
                self.cert, self.key)
            return self
        self.context = load(self.cert, self.key)
        return self

    def changed(self):
        return self.cert and self.key and stamps(self.cert, self.key) != self.stamp

    def reload(self, why):
        """Load the pair again; True if a new context replaced the old."""
        if not self.cert or not self.key:
            return False
        self.stamp = stamps(self.cert, self.key)
        try:
            ctx = load(self.cert, self.key)
        except CertError as e:
            log.err("%s: keeping the old certificate: %s", why, e)
            return False
        log.info("%s: certificate and key re-read from %s and %s", why, self.cert, self.key)
        self.context = ctx
        return True
