"""the forwarder side: smtpfwdd and smtpq"""
