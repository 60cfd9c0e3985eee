"""smtpgate - the package behind smtpd, smtpfwdd and checkrules"""
