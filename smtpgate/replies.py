"""replies - the texts of smtpd's replies ("vanilla messages", spec 3.4)

These are the texts of the original's VANILLA_MESSAGES build; clients only
read the codes.  Kept apart from session.py so that smtpd can send its
greeting before it loads the rest of itself.
"""

VANILLA = {
    220: "Sendmail 4.1/SMI-4.1 ready.", 221: "Closing connection",
    250: "OK", 252: "Can not VRFY user", 354: "OK End with <CRLF>.<CRLF>",
    421: "Service not available, closing transmission channel",
    451: "Requested action not taken: local error in processing",
    452: "Requested action not taken: insufficient system storage",
    500: "Syntax Error, command unrecognized",
    501: "Syntax Error in parameters or arguments",
    502: "Command not implemented", 503: "Bad sequence of commands",
    521: "Doesn't talk SMTP, Sorry",
    552: "Requested mail action aborted: exceeded storage allocation",
    555: "MAIL FROM/RCPT TO parameters not recognized or not implemented",
}
