"""Runner processes: one OS process per model replica, serving one engine on a Unix socket.

`main` and `app` run inside the runner; `process` is the gateway's handle on one runner.
"""
