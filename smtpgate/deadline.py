"""deadline - a moment nothing of a session may outlast

DESCRIPTION
    Deadline(at) is a time.monotonic() moment, or None for none (the tools,
    the fuzzers); Deadline.after(seconds) is that many seconds from now.
    Every wait of a session -- a read from the client, a DNS question, a
    callout, a filter's answer, a Redis call, the DNS lists -- takes
    within(limit, fail): its own limit, or what is left of the session if
    that is less, and fail(why) raised once nothing is left.  One spelling
    for what used to be six.
"""

import math
import time


class Deadline:
    __slots__ = ("at",)

    def __init__(self, at=None):
        self.at = at

    @classmethod
    def after(cls, seconds):
        return cls(time.monotonic() + seconds)

    def left(self):
        """Seconds left (inf without a deadline; <= 0 once passed)."""
        return math.inf if self.at is None else self.at - time.monotonic()

    def passed(self):
        return self.at is not None and time.monotonic() >= self.at

    def within(self, limit, fail):
        """limit, or less if the deadline is nearer; fail(why) once past it."""
        left = self.left()
        if left <= 0:
            raise fail("the session's deadline has passed")
        return min(limit, left)

    def earliest(self, seconds):
        """The moment seconds from now, or the deadline if that is sooner."""
        end = time.monotonic() + seconds
        return end if self.at is None else min(end, self.at)


NONE = Deadline()


def of(value):
    """A Deadline from a Deadline, a time.monotonic() moment or None."""
    return value if isinstance(value, Deadline) else Deadline(value)
