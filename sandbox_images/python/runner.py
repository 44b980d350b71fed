"""agentkeel in-container runner (standard library only).

Reads one JSON request line on stdin, runs it in a child process, and writes one
JSON result line on stdout, then exits.  The container is used once.

Request:  {"v": 2, "kind": "tool", "target": "module:qualname", "args": {...},
           "is_async": false, "deadline_s": 30, "output_limit": 65536,
           "result_limit": 1048576}
      or  {"v": 2, "kind": "code", "code": "print(1)", "deadline_s": 30, ...}

Result:   the tool's result envelope (``envelope.py``, next to this file in the
          image: agentkeel.sandbox.envelope, shared with the subprocess sandbox)
          plus what this runner observed:
          {"v": 2, "ok": true, "value": ..., "exit_code": 0, "stdout": "...",
           "stderr": "...", "stdout_truncated": false, "stderr_truncated": false,
           "duration_s": 0.01}
      or  {"v": 2, "ok": false, "error": {"kind": K, "type": "module.Type",
           "message": "...", "retryable": false, "traceback": "..."}, ...}
with K one of envelope.KINDS: the tool's own failures (exception, import,
bad_request, bad_output, result_too_large, oom) come from the worker; this
runner adds timeout, output_limit, oom, result_too_large, killed, internal.

A worker child is started at once, before the request arrives, and imports
the modules named in /opt/agentkeel/preload, so a warm container answers
without paying for interpreter start-up.  Once the child is ready the runner
writes the line ``agentkeel-runner-ready`` on stderr (the host waits for it
before handing a pooled container out).  ``code`` requests run in that child
as ``python -c`` would (exit status, tracebacks on stderr).

Promises: the child never sees the caller's environment (a fixed minimal one);
the deadline is enforced here by killing every process of the container except
PID 1 and this runner; the child's stdout and stderr are captured and capped
(past the cap the call is stopped and reported as ``output_limit``); the result
is capped at ``result_limit`` bytes of JSON.
"""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time
import traceback


def _load_envelope():
    """The shared result envelope, from the copy of agentkeel/sandbox/envelope.py next to
    this file (loaded by path: the generic sandbox image has no agentkeel)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "envelope.py")
    spec = importlib.util.spec_from_file_location("agentkeel_sandbox_envelope", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


envelope = _load_envelope()

PROTOCOL = 2
MAX_REQUEST = 16 * 1024 * 1024
WORKDIR = "/work"
PRELOAD_FILE = "/opt/agentkeel/preload"
READY_MARKER = "agentkeel-runner-ready"
CHILD_ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "HOME": WORKDIR,
    "TMPDIR": "/tmp",
    "LANG": "C.UTF-8",
}
OOM_FILES = ("/sys/fs/cgroup/memory/memory.oom_control", "/sys/fs/cgroup/memory.events")
# Room for a failure envelope (message and traceback) on top of the result limit.
ERROR_SLACK = 128 * 1024
NOT_FOUND_HINT = ("; build the plugin's image with `agentkeel sandbox build PLUGIN` "
                  "or set image= on the tool")


def _harden_self():
    """Ignore catchable signals (tini forwards them) and become non-dumpable, so
    the tool cannot reach this process through /proc/<pid>/fd or ptrace."""
    for name in ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGPIPE"):
        try:
            signal.signal(getattr(signal, name), signal.SIG_IGN)
        except (AttributeError, OSError, ValueError):
            pass
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE, 0
    except Exception:
        pass


def _oom_kills():
    for path in OOM_FILES:
        try:
            with open(path) as fh:
                for line in fh:
                    key, _, value = line.partition(" ")
                    if key == "oom_kill":
                        return int(value)
        except (OSError, ValueError):
            continue
    return None


def _kill_others():
    """SIGKILL every process in the container except PID 1 and ourselves."""
    me = os.getpid()
    for _ in range(50):
        others = [pid for pid in _pids() if pid not in (1, me)]
        if not others:
            return
        for sig in (signal.SIGSTOP, signal.SIGKILL):
            for pid in others:
                try:
                    os.kill(pid, sig)
                except OSError:
                    pass
        time.sleep(0.01)


def _pids():
    """Live (non-zombie) processes; zombies are reaped by their parent or by PID 1."""
    live = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % name) as fh:
                state = fh.read().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state not in ("Z", "X"):
            live.append(int(name))
    return live


class _Capture(threading.Thread):
    """Reads a stream, keeping the first ``limit`` bytes; calls ``on_overflow`` past it."""

    def __init__(self, stream, limit, on_overflow):
        super().__init__(daemon=True)
        self.stream, self.limit, self.on_overflow = stream, limit, on_overflow
        self.data = bytearray()
        self.truncated = False

    def run(self):
        try:
            while True:
                chunk = self.stream.read1(65536) if hasattr(self.stream, "read1") else self.stream.read(65536)
                if not chunk:
                    return
                room = self.limit - len(self.data)
                if len(chunk) > room:
                    self.data += chunk[: max(room, 0)]
                    if not self.truncated:
                        self.truncated = True
                        self.on_overflow()
                else:
                    self.data += chunk
        except (OSError, ValueError):
            return

    def text(self):
        return self.data.decode("utf-8", "replace")


def _emit(result):
    sys.stdout.write(envelope.dumps(result).decode() + "\n")
    sys.stdout.flush()


def _error(kind, message, **extra):
    return {"v": PROTOCOL, **envelope.failure(kind, message), **extra}


class _Child:
    """The worker process, started before the request arrives so that the
    interpreter start-up (and the image's preloaded modules) cost nothing per call."""

    def __init__(self):
        read_fd, write_fd = os.pipe()
        self.ready_fd, ready_w = os.pipe()
        cwd = WORKDIR if os.path.isdir(WORKDIR) else "/tmp"
        self.oom_before = _oom_kills()
        self.proc = subprocess.Popen(
            [sys.executable, "-I", "-B", os.path.abspath(__file__), "--child", str(write_fd), str(ready_w)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=dict(CHILD_ENV),
            cwd=cwd, pass_fds=(write_fd, ready_w), start_new_session=True,
        )
        os.close(write_fd)
        os.close(ready_w)
        self.overflow = threading.Event()
        self.out = _Capture(self.proc.stdout, 65536, self._on_overflow)
        self.err = _Capture(self.proc.stderr, 65536, self._on_overflow)
        self.res = _Capture(os.fdopen(read_fd, "rb"), 1024 * 1024 + ERROR_SLACK + 1, lambda: None)
        for t in (self.out, self.err, self.res):
            t.start()

    def wait_ready(self):
        """Block until the child has preloaded (or died), then tell the host on stderr."""
        try:
            os.read(self.ready_fd, 1)
        except OSError:
            pass
        os.close(self.ready_fd)
        sys.stderr.write(READY_MARKER + "\n")
        sys.stderr.flush()

    def _wait_exit(self, until):
        """Wait for the child to exit until the monotonic instant ``until``; False on timeout.

        A pidfd wakes us the moment the child exits (Popen.wait(timeout) polls);
        the result pipe is no signal, since processes the tool forked hold it open.
        """
        try:
            pidfd = os.pidfd_open(self.proc.pid)
        except (AttributeError, OSError):
            pidfd = None
        if pidfd is not None:
            import select

            try:
                select.select([pidfd], [], [], max(until - time.monotonic(), 0))
            finally:
                os.close(pidfd)
        try:
            self.proc.wait(timeout=max(until - time.monotonic(), 0.001))
            return True
        except subprocess.TimeoutExpired:
            return False

    def _on_overflow(self):
        self.overflow.set()
        _kill_others()

    def stop(self):
        _kill_others()
        self.proc.wait()

    def run(self, request):
        kind = request.get("kind")
        if kind not in ("tool", "code"):
            return _error("bad_request", "unknown request kind %r" % (kind,))
        if kind == "code" and not isinstance(request.get("code"), str):
            return _error("bad_request", "code request without a string 'code'")
        deadline = float(request.get("deadline_s", 30))
        out_limit = int(request.get("output_limit", 65536))
        result_limit = int(request.get("result_limit", 1024 * 1024))
        self.out.limit = self.err.limit = out_limit
        self.res.limit = result_limit + ERROR_SLACK + 1
        started = time.monotonic()
        try:
            self.proc.stdin.write(json.dumps(request).encode())
            self.proc.stdin.close()
        except OSError:
            pass
        timed_out = not self._wait_exit(started + deadline)
        self.stop()
        for t in (self.out, self.err, self.res):
            t.join(timeout=2)
        return self._result(kind, timed_out, deadline, out_limit, result_limit, time.monotonic() - started)

    def _result(self, kind, timed_out, deadline, out_limit, result_limit, duration):
        code = self.proc.returncode
        common = {
            "stdout": self.out.text(), "stderr": self.err.text(), "stdout_truncated": self.out.truncated,
            "stderr_truncated": self.err.truncated, "duration_s": round(duration, 6), "exit_code": code,
        }
        oom_after = _oom_kills()
        if timed_out:
            return _error("timeout", "stopped at the deadline of %gs" % deadline, **common)
        if self.overflow.is_set():
            return _error("output_limit", "output exceeded %d bytes and the call was stopped" % out_limit, **common)
        if self.oom_before is not None and oom_after is not None and oom_after > self.oom_before:
            return _error("oom", "out of memory: the container's memory limit was reached", **common)
        if len(self.res.data) > result_limit + ERROR_SLACK:
            return _error("result_too_large", "the tool's result is more than %d bytes of JSON" % result_limit,
                          **common)
        if not self.res.data:
            why = "killed by signal %d" % -code if code < 0 else "exit code %d" % code
            if kind == "code" and code >= 0:
                return {"v": PROTOCOL, "ok": True, "value": None, **common}
            return _error("killed", "the process ended (%s) without a result" % why, **common)
        try:
            child = json.loads(self.res.data.decode("utf-8"))
            envelope.decode(child)
        except ValueError:  # MalformedEnvelopeError included
            return _error("bad_output", "the tool process wrote an unreadable result", **common)
        if child["ok"]:
            if len(self.res.data) > result_limit:
                return _error("result_too_large", "the tool's result is more than %d bytes of JSON" % result_limit,
                              **common)
            return {"v": PROTOCOL, "ok": True, "value": child.get("value"), **common}
        return {"v": PROTOCOL, "ok": False, "error": child["error"], **common}


def _preload():
    """Import the modules listed in the image's preload file (best effort)."""
    try:
        with open(PRELOAD_FILE) as fh:
            names = [line.strip() for line in fh if line.strip()]
    except OSError:
        return
    import importlib

    for name in names:
        try:
            importlib.import_module(name)
        except Exception:
            pass


def _run_code(code, result_out):
    """Run ``code`` as ``python -c`` would; the exit status is the process's."""
    status = 0
    try:
        exec(compile(code, "<code>", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
    except SystemExit as exc:
        status = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if exc.code is not None and not isinstance(exc.code, int):
            print(exc.code, file=sys.stderr)
    except BaseException:
        kind, exc, tb = sys.exc_info()
        traceback.print_exception(kind, exc, tb.tb_next if tb is not None else None)
        status = 1
    result_out.close()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def _child(fd, ready_fd):
    """Import and call the tool; write its result envelope (see envelope.py) to ``fd``."""
    result_out = os.fdopen(fd, "wb")
    _preload()
    os.write(ready_fd, b"1")
    os.close(ready_fd)
    request = json.loads(sys.stdin.read() or "{}")
    sys.stdin.close()
    try:
        sys.stdin = open(os.devnull)
    except OSError:
        pass
    if request.get("kind") == "code":
        return _run_code(request.get("code", ""), result_out)
    result_limit = int(request.get("result_limit", envelope.DEFAULT_MAX_BYTES))
    payload = envelope.call_tool(str(request.get("target", "")), request.get("args", {}), max_bytes=result_limit,
                                 not_found_hint=NOT_FOUND_HINT)
    result_out.write(payload)
    result_out.close()


def _finish():
    """Exit the child at once: the result is written, interpreter teardown is wasted time."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(0)


def main(argv):
    if len(argv) == 4 and argv[1] == "--child":
        _child(int(argv[2]), int(argv[3]))
        _finish()
    _harden_self()
    child = _Child()
    child.wait_ready()
    line = sys.stdin.buffer.readline(MAX_REQUEST + 1)
    if not line.strip():
        child.stop()
        return 0  # the host went away before sending a request
    try:
        request = json.loads(line.decode("utf-8"))
        if not isinstance(request, dict):
            raise ValueError("not an object")
    except ValueError as exc:
        child.stop()
        _emit(_error("bad_request", "request is not a JSON object: %s" % exc))
        return 0
    if request.get("v") != PROTOCOL:
        child.stop()
        _emit(_error("bad_request", "protocol version %r, this runner speaks %d" % (request.get("v"), PROTOCOL)))
        return 0
    try:
        _emit(child.run(request))
    except Exception as exc:
        _emit(_error("internal", "runner failure: %s: %s" % (type(exc).__name__, exc)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
