"""One data-parallel engine process: load the engine, then loop over requests and commands.

The loop takes new requests and commands from the inbox, adds the requests to the engine, runs one
engine step and sends the finished outputs back, and for streamed requests what each step added.
Requests from every client therefore share the engine's batches (continuous batching across
requests). Commands (weight sync, cache reset, stats) run between steps.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing as mp
import os
import queue
import signal
import threading
import time
from typing import Any

from flywheel.server.options import ServerOptions

logger = logging.getLogger(__name__)

IDLE_POLL_S = 0.5


def worker_main(dp_rank: int, options: ServerOptions, cuda_devices: str | None, inbox, outbox) -> None:
    """Entry point of one data-parallel worker process."""
    # Watched through spawn's pipe, which is ready once the server has exited, even before this
    # line ran; a parent pid read after loading (or even now) may already be whoever adopted us.
    server = mp.parent_process()
    loaded = threading.Event()
    threading.Thread(target=_exit_if_the_server_dies_while_loading, args=(server, loaded),
                     name="flywheel-server-watch", daemon=True).start()
    if cuda_devices is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = cuda_devices
    else:
        import torch

        # The data-parallel engines share the CPU's cores; more threads than cores slows every step.
        torch.set_num_threads(max(1, torch.get_num_threads() // options.data_parallel_size))
    # Ctrl+C reaches the whole process group; the HTTP process stops the workers in order.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=_logging_level(options.log_level),
                        format=f"%(asctime)s %(levelname)s dp{dp_rank} %(name)s: %(message)s")
    try:
        llm = _load_engine(options, dp_rank)
        ready = {"max_model_len": llm.engine.max_model_len}
        if dp_rank == 0:
            ready["param_shapes"] = _param_shapes(llm)
    except Exception as error:
        logger.exception("loading the engine failed")
        outbox.put(("fatal", dp_rank, f"loading the engine failed: {type(error).__name__}: {error}"))
        return
    loaded.set()
    outbox.put(("ready", dp_rank, ready))
    try:
        _serve(dp_rank, options, server, llm, inbox, outbox)
    except Exception as error:
        logger.exception("engine worker crashed")
        outbox.put(("fatal", dp_rank, f"{type(error).__name__}: {error}"))
    finally:
        from flywheel import weight_sync

        try:
            llm.engine.collective_rpc(weight_sync.rpc_close)
        except Exception:
            logger.debug("closing the weight-sync group at exit failed", exc_info=True)
        llm.shutdown()


def _exit_if_the_server_dies_while_loading(server: mp.process.BaseProcess, loaded: threading.Event) -> None:
    """Loading can take minutes and does not look at the inbox: exit as soon as the server is gone.
    Once loaded, _serve notices instead and shuts the engine down in order."""
    server.join()
    if loaded.is_set():
        return
    logger.warning("the server process is gone; exiting before the engine has loaded")
    try:
        for rank in mp.active_children():  # the engine's tensor-parallel ranks started so far
            rank.terminate()
    finally:
        os._exit(1)


def _logging_level(name: str) -> int:
    return logging.DEBUG if name == "trace" else getattr(logging, name.upper())


def _load_engine(options: ServerOptions, dp_rank: int):
    from flywheel.engine.llm import LLM

    # Each data-parallel engine draws its own random numbers: with one seed, a prompt sent to two
    # engines would get the same completion from both.
    return LLM(
        options.model, revision=options.revision, trust_remote_code=options.trust_remote_code, dtype=options.dtype,
        max_model_len=options.max_model_len,
        enable_prefix_caching=options.enable_prefix_caching, enforce_eager=options.enforce_eager,
        gpu_memory_utilization=options.gpu_memory_utilization, kv_cache_memory_gb=options.kv_cache_memory_gb,
        max_num_seqs=options.max_num_seqs, tensor_parallel_size=options.tensor_parallel_size,
        seed=options.seed + dp_rank,
    )


def _param_shapes(llm) -> dict[str, tuple[int, ...]]:
    from flywheel.engine.weights import hf_parameter_shapes

    return hf_parameter_shapes(llm.engine.hf_config)


def _serve(dp_rank: int, options: ServerOptions, server: mp.process.BaseProcess, llm, inbox, outbox) -> None:
    from flywheel.engine.sampling import SamplingParams

    engine = llm.engine
    in_flight: set[str] = set()
    streams: dict[str, dict[int, _Sent]] = {}  # streamed request id -> what was sent of each completion
    while True:
        if not server.is_alive():
            logger.warning("the server process is gone; exiting")
            return
        messages = []
        if not engine.has_unfinished_requests():
            try:
                messages.append(inbox.get(timeout=IDLE_POLL_S))
            except queue.Empty:
                pass
        while True:
            try:
                messages.append(inbox.get_nowait())
            except queue.Empty:
                break
        for message in messages:
            kind = message[0]
            if kind == "shutdown":
                return
            if kind == "add":
                for request_id, prompt_ids, params, stream in message[1]:
                    try:
                        engine.add_request(request_id, prompt_ids, SamplingParams(**params), stream=stream)
                        in_flight.add(request_id)
                        if stream:
                            streams[request_id] = {}
                    except ValueError as error:  # the request's fault: a 400 naming what to fix
                        outbox.put(("rejected", dp_rank, request_id, f"{error}"))
                    except Exception as error:
                        logger.exception("adding request %s failed", request_id)
                        outbox.put(("failed", dp_rank, request_id,
                                    f"the engine failed: {type(error).__name__}: {error}"))
            elif kind == "abort":
                for request_id in message[1]:
                    engine.abort_request(request_id)
                    in_flight.discard(request_id)
                    streams.pop(request_id, None)
            elif kind == "call":
                _, call_id, name, args = message
                try:
                    outbox.put(("reply", dp_rank, call_id, True, _CALLS[name](dp_rank, options, llm, *args)))
                except Exception as error:
                    logger.exception("%s failed", name)
                    outbox.put(("reply", dp_rank, call_id, False, f"{type(error).__name__}: {error}"))
        if engine.has_unfinished_requests():
            try:
                outputs = engine.step()
            except Exception as error:
                # Fail the requests in flight rather than the whole server; the traceback goes to the log.
                logger.exception("an engine step failed; aborting the %d requests in flight", len(in_flight))
                for request_id in in_flight:
                    engine.abort_request(request_id)
                    outbox.put(("failed", dp_rank, request_id, f"the engine failed: {type(error).__name__}: {error}"))
                in_flight.clear()
                streams.clear()
                continue
            wire = []
            for output in outputs:
                if output.finished:
                    in_flight.discard(output.request_id)
                if output.request_id in streams:
                    sent = streams.pop(output.request_id) if output.finished else streams[output.request_id]
                    wire.append(progress_to_wire(output, sent))
                else:
                    wire.append(output_to_wire(output))
            if wire:
                outbox.put(("outputs", dp_rank, wire))


@dataclasses.dataclass
class _Sent:
    """How much of one streamed completion has been sent."""

    tokens: int = 0
    chars: int = 0
    finished: bool = False


def output_to_wire(output) -> dict[str, Any]:
    """A finished RequestOutput as plain lists (sampled token first in each logprob row)."""
    return {"request_id": output.request_id, "prompt_token_ids": list(output.prompt_token_ids),
            "outputs": [_completion_to_wire(c, c.token_ids, c.text) for c in output.outputs], "finished": True}


def progress_to_wire(output, sent: dict[int, _Sent]) -> dict[str, Any]:
    """What a streamed RequestOutput adds to what was sent: per completion that moved on, its new
    token ids, logprobs and text, and its finish reason once it has one. Moves `sent` on."""
    completions = []
    for completion in output.outputs:
        done = sent.setdefault(completion.index, _Sent())
        text = completion.text
        if completion.finish_reason is None:
            # A character whose UTF-8 bytes have not all arrived decodes as U+FFFD for now.
            text = text.rstrip("\ufffd")
        new_tokens, new_text = completion.token_ids[done.tokens:], text[done.chars:]
        finishing = completion.finish_reason is not None and not done.finished
        if new_tokens or new_text or finishing:
            completions.append(_completion_to_wire(completion, new_tokens, new_text, start=done.tokens))
        done.tokens, done.chars = len(completion.token_ids), max(done.chars, len(text))
        done.finished = completion.finish_reason is not None
    return {"request_id": output.request_id, "outputs": completions, "finished": output.finished}


def _completion_to_wire(completion, token_ids: list[int], text: str, start: int = 0) -> dict[str, Any]:
    logprobs = logprob_token_ids = None
    if completion.logprobs is not None:
        rows = completion.logprobs[start:start + len(token_ids)]
        logprobs = [[entry.logprob for entry in row.values()] for row in rows]
        logprob_token_ids = [list(row.keys()) for row in rows]
    return {"index": completion.index, "token_ids": list(token_ids), "text": text,
            "finish_reason": completion.finish_reason, "logprobs": logprobs, "logprob_token_ids": logprob_token_ids}


def _call_init_communicator(dp_rank, options, llm, host, port, world_size, backend):
    from flywheel import weight_sync

    timeout = options.communicator_timeout
    rank_offset = dp_rank * options.tensor_parallel_size
    llm.engine.collective_rpc(weight_sync.rpc_start_join, host, port, world_size, rank_offset, backend, timeout)
    llm.engine.collective_rpc(weight_sync.rpc_finish_join, timeout)


def _call_update_weights(dp_rank, options, llm, buckets):
    from flywheel import weight_sync

    start = time.perf_counter()
    errors = [e for e in llm.engine.collective_rpc(weight_sync.rpc_receive_and_load, buckets) if e]
    logger.info("weight update: %.1f MiB in %d bucket(s) received and loaded in %.3fs",
                sum(b.nbytes for b in buckets) / 2**20, len(buckets), time.perf_counter() - start)
    try:
        llm.reset_prefix_cache()
    except Exception as error:
        errors.append(f"resetting the prefix cache failed: {error}")
    llm.engine.collective_rpc(weight_sync.rpc_report, bool(errors))
    if errors:
        raise RuntimeError("; ".join(errors))


def _call_stats(dp_rank, options, llm):
    return {"dp_rank": dp_rank, "pid": os.getpid(), "busy": llm.engine.has_unfinished_requests(),
            **dataclasses.asdict(llm.engine.stats)}


def _call_reset_prefix_cache(dp_rank, options, llm):
    llm.reset_prefix_cache()


def _call_close_communicator(dp_rank, options, llm):
    from flywheel import weight_sync

    llm.engine.collective_rpc(weight_sync.rpc_close)


def _call_client_heartbeats(dp_rank, options, llm):
    from flywheel import weight_sync

    return llm.engine.collective_rpc(weight_sync.rpc_client_heartbeats)[0]


def _call_device_uuids(dp_rank, options, llm):
    from flywheel import weight_sync

    return [uuid for uuid in llm.engine.collective_rpc(weight_sync.rpc_device_uuid) if uuid]


_CALLS = {
    "init_communicator": _call_init_communicator,
    "update_weights": _call_update_weights,
    "reset_prefix_cache": _call_reset_prefix_cache,
    "close_communicator": _call_close_communicator,
    "client_heartbeats": _call_client_heartbeats,
    "device_uuids": _call_device_uuids,
    "stats": _call_stats,
}
