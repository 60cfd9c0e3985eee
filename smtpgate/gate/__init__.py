"""the gate side: smtpd"""
