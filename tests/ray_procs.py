"""Stop exactly the Ray processes a test started, never another Ray on the machine (`ray stop` stops all).

A test starts its Ray (`ray start --head`, or a sweep that starts a local Ray) in a new session
(`start_new_session=True`); Ray's daemons and workers inherit that session id. Job drivers and their
log watchers start sessions of their own (ray/dashboard/modules/job/job_supervisor.py), so the
descendants of the session's processes are stopped too.
"""

import os
import signal

import psutil


def session_processes(sid: int) -> list[psutil.Process]:
    found = {}
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == sid:
                found[p.pid] = p
                found.update({c.pid: c for c in p.children(recursive=True)})
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return list(found.values())


def stop_session(sid: int, timeout: float = 30, graceful: bool = True) -> None:
    """SIGTERM every process of session `sid`; SIGKILL what is left after `timeout` s (at once, without
    `graceful`: a machine that dies)."""
    procs = session_processes(sid)
    alive = procs
    if graceful:
        for p in procs:
            try:
                p.send_signal(signal.SIGTERM)
            except psutil.Error:
                pass
        _, alive = psutil.wait_procs(procs, timeout=timeout)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=10)
