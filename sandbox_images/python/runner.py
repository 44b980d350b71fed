"""agentkeel in-container runner (standard library only).

Reads one JSON request line on stdin, runs it in a child process, and writes one
authenticated JSON result line on stdout, then exits.  The container is used once.

Request:  {"v": 3, "key": "<64 hex digits>", "kind": "tool", "target": "module:qualname",
           "args": {...}, "is_async": false, "deadline_s": 30, "output_limit": 65536,
           "result_limit": 1048576}
      or  {"v": 3, "key": "...", "kind": "code", "code": "print(1)", "deadline_s": 30, ...}

``key`` is a secret the host draws for this one call.  The runner takes it out
of the request before anything else sees the request (the worker never gets it)
and authenticates its reply with it.

Reply:    one line, ``<MAC> <JSON>``: MAC is the lowercase hex HMAC-SHA256, keyed
          with ``key``, of the exact JSON bytes after the space.  The JSON is the
          tool's result envelope (``envelope.py``, next to this file in the image:
          agentkeel.sandbox.envelope, shared with the subprocess sandbox) plus what
          this runner observed:
          {"v": 3, "ok": true, "value": ..., "exit_code": 0, "stdout": "...",
           "stderr": "...", "stdout_truncated": false, "stderr_truncated": false,
           "duration_s": 0.01}
      or  {"v": 3, "ok": false, "error": {"kind": K, "type": "module.Type",
           "message": "...", "retryable": false, "traceback": "..."}, ...}
          A request the runner cannot read (no valid key) gets the bare JSON
          without a MAC, which the host refuses.
with K one of envelope.KINDS: the tool's own failures (exception, import,
bad_request, bad_output, result_too_large, oom) come from the worker; this
runner adds timeout, output_limit, oom, result_too_large, killed, internal.
The tool's value is forwarded as the worker wrote it (a NaN included): the
host's bounded decode (agentkeel.jsonvalue) is the one judge of what it accepts.

The reply channel: the runner is the container's PID 1 (the container has no
init process) and makes itself non-dumpable before it starts the worker, so no
other process of the container, all running as the same uid without
capabilities, can open ``/proc/1/fd/1`` (the container's stdout, which the host
reads), read its memory or the key, ptrace it, or stop or kill it (PID 1 of a
pid namespace gets no SIGKILL or SIGSTOP from inside it).  If either cannot be
had (not PID 1, prctl unavailable or failing) the runner refuses to serve.  As
init it reaps the orphaned processes of the call (every zombie child but the
worker, whose exit status is the call's).

A worker child is started at once, before the request arrives, and imports
the modules named in /opt/agentkeel/preload, so a warm container answers
without paying for interpreter start-up.  Once the child is ready the runner
writes the line ``agentkeel-runner-ready`` on stderr (the host waits for it
before handing a pooled container out).  The worker is non-dumpable too, so the
processes a tool starts (the code ``run_python`` runs) cannot reach its result
pipe.  ``code`` requests run in that child as ``python -c`` would (exit status,
tracebacks on stderr); the worker closes its result pipe before the code runs
and the runner ignores that pipe for them: a code run's outcome is its exit
status and its streams.

Promises: the child never sees the caller's environment (a fixed minimal one);
the deadline is enforced here by killing every process of the container but
this runner; the child's stdout and stderr are captured and capped (past the
cap the call is stopped and reported as ``output_limit``); the result is capped
at ``result_limit`` bytes of JSON.
"""

import hashlib
import hmac
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

PROTOCOL = 3
MAX_REQUEST = 16 * 1024 * 1024
WORKDIR = "/work"
PRELOAD_FILE = "/opt/agentkeel/preload"
READY_MARKER = "agentkeel-runner-ready"
KEY_FIELD = "key"
KEY_HEX_LENGTH = 64  # 32 bytes
PR_GET_DUMPABLE = 3
PR_SET_DUMPABLE = 4
REFUSED_EXIT = 70  # EX_SOFTWARE: the runner refused to serve
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


class Unsafe(Exception):
    """The runner cannot protect its reply channel here, so it does not serve."""


def _set_non_dumpable():
    """PR_SET_DUMPABLE 0, checked with PR_GET_DUMPABLE; ``Unsafe`` when it cannot be had.

    A non-dumpable process's /proc entries (fd, mem, environ...) and ptrace are
    closed to processes of the same uid that lack CAP_SYS_PTRACE, which every
    process of the container lacks (all capabilities are dropped)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
            raise Unsafe("prctl(PR_SET_DUMPABLE, 0) failed: %s" % os.strerror(ctypes.get_errno()))
        if libc.prctl(PR_GET_DUMPABLE, 0, 0, 0, 0) != 0:
            raise Unsafe("the process is still dumpable after prctl(PR_SET_DUMPABLE, 0)")
    except Unsafe:
        raise
    except Exception as exc:  # no ctypes, no libc, no prctl
        raise Unsafe("cannot make this process non-dumpable: %s: %s" % (type(exc).__name__, exc)) from None


def _harden_self():
    """Protect the reply channel before any other code runs (see the module docs).

    Called first thing in ``main``, before the worker (hence any tool or plugin
    code) starts.  Raises ``Unsafe`` when the runner is not PID 1 or cannot
    become non-dumpable."""
    if os.getpid() != 1:
        raise Unsafe("the runner is PID %d, not the container's PID 1: start the container without an "
                     "init process (docker run --init and HostConfig.Init are not supported), or other "
                     "processes could reach the container's stdout" % os.getpid())
    _set_non_dumpable()
    for name in ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGPIPE"):
        try:
            signal.signal(getattr(signal, name), signal.SIG_IGN)
        except (AttributeError, OSError, ValueError):
            pass
    signal.signal(signal.SIGCHLD, _reap_orphans)


# The worker's Popen once started: the one child the reaper leaves to Popen.
_WORKER = []


def _reap_orphans(signum=None, frame=None):
    """Reap the zombie children of this runner (as PID 1 it inherits every orphan),
    except the worker while Popen has not collected its exit status."""
    if not _WORKER:
        return  # the worker's pid is not known yet: reaping now could steal its status
    proc = _WORKER[0]
    keep = proc.pid if proc.returncode is None else None
    me = os.getpid()
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == keep:
            continue
        try:
            with open("/proc/%s/stat" % name) as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if len(fields) > 1 and fields[0] == "Z" and fields[1] == str(me):
            try:
                os.waitpid(int(name), os.WNOHANG)
            except OSError:
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
    """SIGKILL every process in the container except ourselves (PID 1)."""
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


def _reply_bytes(result):
    """The reply's JSON.  The tool's value is forwarded as read, non-finite numbers
    included (the host rejects them naming the field); a value that cannot be
    encoded again becomes a bad_output failure."""
    try:
        return json.dumps(result, separators=(",", ":")).encode()
    except (ValueError, TypeError, RecursionError):
        keep = {k: result[k] for k in ("stdout", "stderr", "stdout_truncated", "stderr_truncated", "duration_s",
                                       "exit_code") if k in result}
        return envelope.dumps(_error("bad_output", "the tool's result cannot be encoded as JSON again", **keep))


def _emit(result, key):
    """Write the one reply line: ``<hex HMAC-SHA256 of the JSON> <JSON>``; bare JSON without a key."""
    body = _reply_bytes(result)
    line = body if key is None else hmac.new(key, body, hashlib.sha256).hexdigest().encode() + b" " + body
    sys.stdout.buffer.write(line + b"\n")
    sys.stdout.buffer.flush()


def _take_key(request):
    """Remove the reply key from ``request`` (it must never reach the worker); its bytes, or None."""
    key = request.pop(KEY_FIELD, None)
    if not isinstance(key, str) or len(key) != KEY_HEX_LENGTH:
        return None
    try:
        return bytes.fromhex(key)
    except ValueError:
        return None


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
        _WORKER[:] = [self.proc]
        _reap_orphans()  # anything that became a zombie while the pid was unknown
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
        if kind == "code":
            # The code's outcome is its exit status and streams; its result pipe was closed
            # before it ran, and whatever arrived there is not trusted.
            if code is not None and code >= 0:
                return {"v": PROTOCOL, "ok": True, "value": None, **common}
            return _error("killed", "the code was killed by signal %d" % -code, **common)
        if len(self.res.data) > result_limit + ERROR_SLACK:
            return _error("result_too_large", "the tool's result is more than %d bytes of JSON" % result_limit,
                          **common)
        if not self.res.data:
            why = "killed by signal %d" % -code if code < 0 else "exit code %d" % code
            return _error("killed", "the process ended (%s) without a result" % why, **common)
        try:
            child = json.loads(self.res.data.decode("utf-8"))
            envelope.decode(child)
        except RecursionError:
            return _error("bad_output", "the tool process wrote a result nested too deeply to read", **common)
        except ValueError:  # MalformedEnvelopeError and UnicodeDecodeError included
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


def _run_code(code):
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
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def _child(fd, ready_fd):
    """Import and call the tool; write its result envelope (see envelope.py) to ``fd``."""
    try:
        _set_non_dumpable()  # the processes the tool starts cannot reach fd through /proc
    except Unsafe as exc:
        sys.stderr.write("agentkeel runner worker: refusing to run: %s\n" % exc)
        sys.stderr.flush()
        os._exit(REFUSED_EXIT)
    os.set_inheritable(fd, False)  # not even a tool's os.system children inherit it
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
        result_out.close()  # the code's outcome is its exit status: it gets no result channel
        return _run_code(request.get("code", ""))
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
    try:
        _harden_self()  # first: no tool or plugin code has run yet
    except Unsafe as exc:
        sys.stderr.write("agentkeel runner: refusing to serve: %s\n" % exc)
        sys.stderr.flush()
        return REFUSED_EXIT
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
    except (ValueError, RecursionError) as exc:
        child.stop()
        _emit(_error("bad_request", "request is not a JSON object: %s" % exc), None)
        return 0
    key = _take_key(request)
    if request.get("v") != PROTOCOL:
        child.stop()
        _emit(_error("bad_request", "protocol version %r, this runner speaks %d" % (request.get("v"), PROTOCOL)),
              key)
        return 0
    if key is None:
        child.stop()
        _emit(_error("bad_request", "the request has no valid reply key"), None)
        return 0
    try:
        result = child.run(request)
    except Exception as exc:
        result = _error("internal", "runner failure: %s: %s" % (type(exc).__name__, exc))
    _emit(result, key)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
