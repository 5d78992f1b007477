"""``governor serve``: the daemon in front of a supervisor, its SQLite journal, and the live
views (``governor top``'s data and the status page)."""
