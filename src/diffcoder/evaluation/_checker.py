"""The trusted test driver: runs a task's test code against proxies of the program's objects.

It runs in a child of the launcher, outside the sandbox, never in the program's process. The program can only
answer requests (load your code, give me these names, call this function); each answer is decoded by `_wire`
into plain values before the test code sees it, so the comparisons in the test are between real builtin
values, and the test code and its expected values never reach the program. The verdict is what this driver
saw: every statement of the test ran and none raised. Stdlib only (the launcher runs with `python -I -S`).
"""

import builtins
import importlib
import marshal
import os
import sys

import _wire

SYNTAX_ERRORS = ("SyntaxError", "IndentationError", "TabError")
NETWORK_ERRNOS = (101, 110, 111, 113)  # ENETUNREACH, ETIMEDOUT, ECONNREFUSED, EHOSTUNREACH
PERMISSION_ERRNOS = (1, 13, 30)  # EPERM, EACCES, EROFS


class ProgramFault(BaseException):
    """The program failed in a way the test code must not see: a broken channel, a bad answer. Not an
    Exception, so a test's `except Exception` cannot swallow it; and the channel stays broken after it."""

    def __init__(self, kind: str, detail: str):
        super().__init__(detail)
        self.kind, self.detail = kind, detail


class ChannelClosed(ProgramFault):
    """The program's process ended or closed its side: the launcher tells how it ended."""


class RemoteError(Exception):
    """Raised in the test where the program's code raised; subclasses also derive from the builtin exception
    of the same name, so a test's `except ValueError` behaves as it would in one process."""

    kind = "runtime_error"
    detail = ""


_remote_classes: dict[str, type] = {}


def remote_kind(err: dict) -> str:
    """The outcome kind of an exception the program raised (by its type name, errno and message)."""
    name, errno, low = err.get("type", ""), err.get("errno"), str(err.get("message", "")).lower()
    if name in SYNTAX_ERRORS:
        return "syntax_error"
    if name == "AssertionError":
        return "wrong_answer"
    if name == "MemoryError" or errno == 12:
        return "memory_limit"
    if errno == 27:
        return "output_limit"
    if name == "BlockingIOError" or errno == 11:
        return "process_limit"
    if errno in NETWORK_ERRNOS or name in ("gaierror", "herror") or "name resolution" in low:
        return "network"
    if name == "PermissionError" or errno in PERMISSION_ERRNOS:
        return "permission"
    return "runtime_error"


def remote_error(err: object) -> RemoteError:
    if type(err) is not dict or type(err.get("type")) is not str:
        raise ProgramFault("runtime_error", "the program broke the test protocol: a malformed error")
    name = err["type"]
    base = getattr(builtins, name, None) if err.get("builtin") else None
    if not (isinstance(base, type) and issubclass(base, Exception)) or base is Exception:
        base = None  # not a builtin exception: a plain RemoteError
    cls = _remote_classes.get(name if base else "")
    if cls is None:
        try:
            cls = type(name, (base, RemoteError), {}) if base else RemoteError
        except TypeError:  # a builtin exception type that cannot be combined
            cls = RemoteError
        _remote_classes[name if base else ""] = cls
    where = f" (solution.py line {err['line']})" if type(err.get("line")) is int else ""
    exc = cls.__new__(cls)
    exc.args = (f"{name}: {err.get('message', '')}"[:1000],)
    exc.kind, exc.detail = remote_kind(err), f"{name}: {str(err.get('message', ''))[:500]}{where}"
    return exc


class Channel:
    """Requests to the runner inside the sandbox; answers limited to `limit` bytes."""

    def __init__(self, rfd: int, wfd: int, limit: int):
        self.rfd, self.wfd, self.limit = rfd, wfd, limit
        self.fault: ProgramFault | None = None  # once broken, every later request fails the same way

    def request(self, message: dict) -> object:
        if self.fault is not None:
            raise self.fault
        try:
            _wire.send_trusted(self.wfd, message)
            reply = _wire.recv(self.rfd, self.limit)
        except (EOFError, OSError) as exc:
            self.fault = ChannelClosed("early_exit", f"the program's process ended or closed its channel ({exc})")
        except _wire.FrameTooLarge as exc:
            self.fault = ProgramFault("output_limit", f"the program answered with {exc}")
        except _wire.ProtocolError as exc:
            self.fault = ProgramFault("runtime_error", f"the program broke the test protocol: {exc}")
        if self.fault is not None:
            raise self.fault
        if "error" in reply:
            raise remote_error(reply["error"])
        if "ok" not in reply:
            self.fault = ProgramFault("runtime_error", "the program broke the test protocol: an answer without a value")
            raise self.fault
        return reply["ok"]

    def value(self, tree: object) -> object:
        try:
            return _wire.decode(tree, self.remote)
        except _wire.ProtocolError as exc:
            self.fault = ProgramFault("runtime_error", f"the program answered with a value that is not plain: {exc}")
        except MemoryError:
            self.fault = ProgramFault("memory_limit", "the program answered with a value too large to hold")
        raise self.fault

    def remote(self, ref: int, type_name: str) -> "Remote":
        return Remote(self, ref, type_name)

    def encode(self, value: object) -> object:
        def handle(obj: object) -> list:
            if isinstance(obj, Remote):
                return ["H", obj._ref, obj._type]
            raise TestError(f"the test passes a {type(obj).__name__} to the program, which cannot cross the sandbox")

        return _wire.encode(value, handle)

    def call(self, ref: int, args: tuple, kwargs: dict) -> object:
        return self.value(self.request({"op": "call", "ref": ref, "args": self.encode(args),
                                        "kwargs": self.encode(kwargs)}))

    def apply(self, ref: int, what: str, *arg: object) -> object:
        message = {"op": "apply", "ref": ref, "what": what}
        if arg:
            message["arg"] = self.encode(arg[0])
        return self.value(self.request(message))


class TestError(BaseException):
    """The trusted side cannot run the test (our failure or the benchmark's, never the program's)."""


class Remote:
    """An object that stays in the sandbox (a function, a class, an instance). Calls, attributes, truth, len,
    items, membership, iteration and str are answered by the program as plain values; equality is identity,
    so a remote object never equals a plain value."""

    __slots__ = ("_channel", "_ref", "_type")

    def __init__(self, channel: Channel, ref: int, type_name: str):
        object.__setattr__(self, "_channel", channel)
        object.__setattr__(self, "_ref", ref)
        object.__setattr__(self, "_type", type_name)

    def __call__(self, *args, **kwargs):
        return self._channel.call(self._ref, args, kwargs)

    def __getattr__(self, name: str):
        if name.startswith("__"):  # protocols probed by the stdlib (copy, pickle...) stay local
            raise AttributeError(name)
        return self._channel.apply(self._ref, "attr", name)

    def __bool__(self) -> bool:
        return _exact(self._channel.apply(self._ref, "bool"), bool)

    def __len__(self) -> int:
        return _exact(self._channel.apply(self._ref, "len"), int)

    def __iter__(self):
        return iter(_exact(self._channel.apply(self._ref, "iter"), list))

    def __getitem__(self, key):
        return self._channel.apply(self._ref, "getitem", key)

    def __contains__(self, item) -> bool:
        return _exact(self._channel.apply(self._ref, "contains", item), bool)

    def __str__(self) -> str:
        return _exact(self._channel.apply(self._ref, "str"), str)

    def __repr__(self) -> str:
        return _exact(self._channel.apply(self._ref, "repr"), str)


def _exact(value: object, t: type) -> object:
    if type(value) is not t:
        raise ProgramFault("runtime_error", f"the program answered a {type(value).__name__} where Python "
                                            f"requires a {t.__name__}")
    return value


def _compile(source: str, name: str):
    try:  # optimize=0: the test's asserts run whatever flags this interpreter has
        return compile(source, name, "exec", dont_inherit=True, optimize=0)
    except (SyntaxError, ValueError) as exc:
        raise TestError(f"the {name.strip('<>')} code does not compile: {exc}") from None


def namespace(job: dict, channel: Channel) -> dict:
    """The test's globals: the trusted context, then the program's values of the names the test needs."""
    space = {"__name__": "__main__", "__builtins__": builtins}
    try:
        exec(_compile(job.get("context", ""), "<context>"), space)
    except Exception as exc:  # noqa: BLE001 - trusted code that fails is the benchmark's problem
        raise TestError(f"the context code failed: {type(exc).__name__}: {exc}") from None
    answer = channel.request({"op": "names", "names": job["names"]})
    if type(answer) is not dict:
        raise ProgramFault("runtime_error", "the program broke the test protocol: names are not a mapping")
    for name in job["names"]:
        if name not in answer:
            if name == job.get("entry_point"):
                space.pop(name, None)  # a stub from the context must not stand in for a missing function
            continue
        if name in sys.stdlib_module_names and name != job.get("entry_point"):
            # A standard module the program imported (or faked: a class named `sys` answering getsizeof):
            # the test gets our own copy, so its expected values never come from the program.
            space[name] = importlib.import_module(name)
        else:
            space[name] = channel.value(answer[name])
    return space


def _failing_line(exc: BaseException, test: str) -> str:
    line, tb = None, exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "<test>":
            line = tb.tb_lineno
        tb = tb.tb_next
    lines = test.splitlines()
    return f"test line {line}: {lines[line - 1].strip()[:300]}" if line and line <= len(lines) else "a test failed"


def judge(job: dict, channel: Channel, runtime: bytes) -> dict:
    """Send the runner its code (`runtime`: marshalled sources or code objects of _wire and _runner), load the
    program, run the test; the verdict as a dict."""
    try:
        test = _compile(job["test"], "<test>")
        _compile(job.get("context", ""), "<context>")
    except TestError as exc:
        return {"status": "test_error", "detail": str(exc)}
    try:
        _wire.write_frame(channel.wfd, runtime)
        hello = _wire.recv(channel.rfd, 1 << 16)
        if "hello" not in hello:
            raise _wire.ProtocolError("no hello")
    except (EOFError, OSError, _wire.ProtocolError) as exc:  # nothing of the program has run yet
        return {"status": "setup_failed", "detail": f"the sandboxed interpreter did not start ({exc})"}
    try:
        channel.request({"op": "load", "code": job["code"]})
        exec(test, namespace(job, channel))
        channel.request({"op": "bye"})
    except ChannelClosed as exc:
        return {"status": "gone", "detail": exc.detail}
    except ProgramFault as exc:
        return {"status": "failed", "kind": exc.kind, "detail": exc.detail}
    except RemoteError as exc:
        return {"status": "failed", "kind": exc.kind, "detail": exc.detail}
    except TestError as exc:
        return {"status": "test_error", "detail": str(exc)}
    except AssertionError as exc:
        return {"status": "failed", "kind": "wrong_answer", "detail": _failing_line(exc, job["test"])}
    except MemoryError:
        return {"status": "failed", "kind": "memory_limit", "detail": "the test ran out of memory on the answers"}
    except Exception as exc:  # noqa: BLE001 - the test's own error on the program's answers (e.g. None)
        return {"status": "failed", "kind": "runtime_error",
                "detail": f"{type(exc).__name__}: {str(exc)[:300]} ({_failing_line(exc, job['test'])})"}
    return {"status": "passed"}


def main(job: dict, rfd: int, wfd: int, verdict_fd: int, runtime: bytes) -> None:
    """Entry point in the forked checker process: judge and write the verdict as one JSON document."""
    channel = Channel(rfd, wfd, int(job["limits"]["file_size_mb"]) << 20)
    try:
        verdict = judge(job, channel, runtime)
    except BaseException as exc:  # noqa: BLE001 - our own failure: reported, never taken as the program's
        verdict = {"status": "internal", "detail": f"checker failed: {type(exc).__name__}: {exc}"[:1000]}
    data = marshal.dumps(verdict)
    while data:
        data = data[os.write(verdict_fd, data):]
