"""The in-process sandbox: async tools on the event loop, sync tools on a worker thread.

The timeout cancels an async tool. It cannot stop a sync tool's thread: the call
is abandoned and the thread runs on, so its effect may still happen. Hence
(``stops_sync_calls = False``) the registry lets a sync tool that is not
retry-safe run here only with ``allow_uncancellable=True``, and a timed-out call
of such a tool leaves its step ``in_doubt`` (the executor's rule for every
timeout of a tool that is not retry-safe). A retry never overlaps the attempt it
replaces: the next attempt of the same step first waits for the abandoned
thread, up to the tool's timeout, and fails without running when it is still busy.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import functools
from typing import Any

from agentkeel.config import Config
from agentkeel.errors import ToolError, ToolTimeoutError
from agentkeel.markers import hookimpl
from agentkeel.sandbox.protocol import SandboxBackend, ToolCall

_Key = tuple[str, int, str]


def _expire(task: asyncio.Task[Any], expired: list[bool]) -> None:
    expired.append(True)
    task.cancel()


class InProcessBackend:
    """Runs tools on the host's event loop (async) or a worker thread (sync)."""

    strength = 0
    stops_sync_calls = False

    def __init__(self) -> None:
        # Threads of timed-out sync calls that are still running, by (run, step, kind).
        self._abandoned: dict[_Key, concurrent.futures.Future[Any]] = {}

    async def run(self, call: ToolCall) -> Any:
        spec = call.spec
        if spec.is_async:
            # asyncio.timeout's semantics with less work on the per-step path (one timer, one
            # running-loop lookup): at the deadline the task is cancelled; that cancellation, and
            # only that one, becomes ToolTimeoutError.
            loop = asyncio.get_running_loop()
            task = asyncio.current_task(loop)
            assert task is not None
            cancelling = task.cancelling()
            expired: list[bool] = []
            handle = loop.call_later(call.timeout, _expire, task, expired)
            try:
                return await spec.fn(**call.args)
            except asyncio.CancelledError:
                if expired:
                    expired.clear()
                    if task.uncancel() <= cancelling:  # ours alone: the deadline, not a cancelled run
                        raise ToolTimeoutError(f"{spec.name} timed out after {call.timeout:g}s") from None
                raise
            except ToolError:
                raise
            except Exception as exc:
                raise ToolError(f"{type(exc).__name__}: {exc}") from exc
            finally:
                handle.cancel()
                if expired:  # the tool swallowed the cancellation and went on: take it back
                    task.uncancel()
        return await self._run_sync(call)

    async def _run_sync(self, call: ToolCall) -> Any:
        spec = call.spec
        key = (call.run_id, call.step_id, call.kind)
        if self._abandoned:
            await self._wait_abandoned(key, call)
        loop = asyncio.get_running_loop()
        context = contextvars.copy_context()
        thread_future: concurrent.futures.Future[Any] = concurrent.futures.Future()

        def work() -> None:
            if not thread_future.set_running_or_notify_cancel():
                return
            try:
                thread_future.set_result(context.run(functools.partial(spec.fn, **call.args)))
            except BaseException as exc:  # noqa: BLE001 - handed to the awaiting side
                thread_future.set_exception(exc)

        loop.run_in_executor(None, work)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(thread_future), call.timeout)
        except TimeoutError as exc:
            if not thread_future.done() or thread_future.cancelled():
                if thread_future.running():
                    self._abandon(key, thread_future)
                raise ToolTimeoutError(
                    f"{spec.name} timed out after {call.timeout:g}s; its thread could not be stopped and "
                    f"may still complete the call"
                ) from None
            raise ToolError(f"TimeoutError: {exc}") from exc
        except ToolError:
            raise
        except Exception as exc:
            raise ToolError(f"{type(exc).__name__}: {exc}") from exc

    def _abandon(self, key: _Key, future: concurrent.futures.Future[Any]) -> None:
        self._abandoned[key] = future
        future.add_done_callback(lambda f: self._abandoned.pop(key, None) if self._abandoned.get(key) is f else None)

    async def _wait_abandoned(self, key: _Key, call: ToolCall) -> None:
        """Let the previous attempt's thread finish before this attempt starts (no overlap)."""
        previous = self._abandoned.get(key)
        if previous is None:
            return
        done, _ = await asyncio.wait([asyncio.wrap_future(previous)], timeout=call.timeout)
        if not done:
            raise ToolError(
                f"{call.spec.name}: the previous attempt of this step timed out and is still running after "
                f"another {call.timeout:g}s; not starting a second one alongside it",
                retryable=False,
            )

    async def aclose(self) -> None:
        return None


@hookimpl
def agentkeel_register_sandboxes(register: Any, config: Config) -> None:
    backend: SandboxBackend = InProcessBackend()
    register("inprocess", backend)
