"""When the engine process dies, when to start it again, and when to give up.

Each death (or failed restart) waits a back-off that doubles with the deaths of the recent
window before the next start; too many deaths in the window mean the engine cannot run
here, and the server exits non-zero so that its supervisor can act.
"""

from __future__ import annotations

from collections import deque
from typing import Optional

# Deaths older than this are forgiven: an engine that served this long was healthy.
RESTART_WINDOW_S = 300.0
# This many deaths within the window end the server (exit status ENGINE_FAILED_EXIT_CODE).
MAX_DEATHS_IN_WINDOW = 5
# The first restart waits this long (a crash loop must not spin); each further death in the
# window doubles the wait, up to BACKOFF_MAX_S.
BACKOFF_BASE_S = 0.5
BACKOFF_MAX_S = 30.0
# The server's exit status when it gives up on the engine (1 is Python's for any error).
ENGINE_FAILED_EXIT_CODE = 3


class RestartPolicy:
    def __init__(self, window_s: float = RESTART_WINDOW_S, max_deaths: int = MAX_DEATHS_IN_WINDOW,
                 base_s: float = BACKOFF_BASE_S, cap_s: float = BACKOFF_MAX_S):
        self.window_s, self.max_deaths = window_s, max_deaths
        self.base_s, self.cap_s = base_s, cap_s
        self._deaths: deque[float] = deque()

    def on_death(self, now: float) -> Optional[float]:
        """Seconds to wait before the next start, or None: give up."""
        self._deaths.append(now)
        while self._deaths and now - self._deaths[0] > self.window_s:
            self._deaths.popleft()
        n = len(self._deaths)
        if n >= self.max_deaths:
            return None
        return min(self.cap_s, self.base_s * 2 ** (n - 1))

    @property
    def recent_deaths(self) -> int:
        return len(self._deaths)
