"""The proxy's logs: what happened to every request, and every error, on disk.

- :mod:`.writer`: the one thread that writes log files, so no request waits
  for a disk (and a failing disk never stops the proxy);
- :mod:`.request_log`: one file per request, its attempts and reply;
- :mod:`.error_log`: one file per error, with the upstream's own words;
- :mod:`.views`: the HTTP views that list and read them back (``/logs/...``);
- :mod:`.request_detail`: a request log read back into its parts for the dashboard.

Masking secrets is not here: it applies to every text that leaves the proxy
(error bodies, console lines, pages), so it is :mod:`first_hop_proxy.redact`.
"""
