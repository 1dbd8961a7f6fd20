"""Inside the sandbox: load the program's code, then answer the trusted checker's requests.

The launcher sends this file and `_wire` into the sandboxed interpreter (stdlib only; nothing of the host's
files is needed). Nothing here is trusted: the program runs in this process and may replace any of it. The
checker therefore treats every answer as data, decoded strictly into plain values, or as a handle to an
object that stays here; the test code and its expected values never enter this process.
"""

import builtins
import os
import site
import sys
import types

import _wire

ITER_LIMIT = 1_000_000  # items drawn from an iterator the program returned


class Runner:
    def __init__(self, rfd: int, wfd: int):
        self.rfd, self.wfd = rfd, wfd
        self.objects: dict[int, object] = {}  # handle -> object (kept alive, so ids stay unique)
        self.refs: dict[int, int] = {}  # id(object) -> handle
        self.module = types.ModuleType("__main__")

    def handle(self, obj: object) -> list:
        ref = self.refs.get(id(obj))
        if ref is None:
            ref = self.refs[id(obj)] = len(self.objects) + 1
            self.objects[ref] = obj
        return ["H", ref, type(obj).__name__]

    def encode(self, value: object) -> object:
        return _wire.encode(value, self.handle)

    def decode(self, tree: object) -> object:
        return _wire.decode(tree, lambda ref, _type: self.objects[ref])

    def op_load(self, msg: dict) -> object:
        """Run the program's code as the __main__ module (as `python solution.py` would)."""
        code, path = msg["code"], os.path.abspath("solution.py")
        with open(path, "w", encoding="utf-8") as f:  # for tracebacks and tools that read their own source
            f.write(code)
        self.module.__dict__.update(__file__=path, __builtins__=builtins)
        sys.modules["__main__"] = self.module
        exec(compile(code, path, "exec", dont_inherit=True), self.module.__dict__)
        return None

    def op_names(self, msg: dict) -> dict:
        """The program's values of the names the test uses (those it defines)."""
        space = self.module.__dict__
        return {name: self.encode(space[name]) for name in msg["names"] if name in space}

    def op_call(self, msg: dict) -> object:
        fn = self.objects[msg["ref"]]
        return self.encode(fn(*self.decode(msg["args"]), **self.decode(msg["kwargs"])))

    def op_apply(self, msg: dict) -> object:
        """A builtin operation on a handle: attribute, truth, len, str, repr, items, membership, iteration."""
        obj, what = self.objects[msg["ref"]], msg["what"]
        arg = self.decode(msg["arg"]) if "arg" in msg else None
        if what == "iter":
            items = []
            for item in obj:
                if len(items) == ITER_LIMIT:
                    raise OverflowError(f"an iterator with more than {ITER_LIMIT} items")
                items.append(item)
            return self.encode(items)
        ops = {"attr": getattr, "bool": bool, "len": len, "str": str, "repr": repr,
               "getitem": lambda o, k: o[k], "contains": lambda o, k: k in o}
        return self.encode(ops[what](obj, arg) if what in ("attr", "getitem", "contains") else ops[what](obj))

    def error(self, exc: BaseException) -> dict:
        line = None
        tb = exc.__traceback__
        while tb is not None:
            if tb.tb_frame.f_code.co_filename == self.module.__dict__.get("__file__"):
                line = tb.tb_lineno
            tb = tb.tb_next
        try:
            message = str(exc)[:1000]
        except Exception:  # noqa: BLE001 - a program's exception may break str()
            message = "(unprintable)"
        return {"type": type(exc).__name__, "builtin": type(exc).__module__ == "builtins", "message": message,
                "errno": getattr(exc, "errno", None) if isinstance(getattr(exc, "errno", None), int) else None,
                "line": line}

    def serve(self) -> None:
        _wire.send(self.wfd, {"hello": os.getpid()})
        while True:
            msg = _wire.recv_trusted(self.rfd)
            if msg["op"] == "bye":
                for stream in (sys.stdout, sys.stderr):
                    try:
                        stream.flush()
                    except Exception:  # noqa: BLE001 - the program may have replaced or closed them
                        pass
                _wire.send(self.wfd, {"ok": None})
                os._exit(0)  # threads the program left behind must not keep us alive
            try:
                reply = {"ok": getattr(self, "op_" + msg["op"])(msg)}
            except Exception as exc:  # noqa: BLE001 - the program's errors are answers; SystemExit ends us
                reply = {"error": self.error(exc)}
            _wire.send(self.wfd, reply)


def serve(rfd: int, wfd: int) -> None:
    # The interpreter runs with -S (site's start-up costs a third of ours): give programs what site would,
    # exit() and quit() above all; there are no site-packages to add.
    site.setquit()
    site.setcopyright()
    site.sethelper()
    Runner(rfd, wfd).serve()
